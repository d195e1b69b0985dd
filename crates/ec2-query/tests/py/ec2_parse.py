"""Parses EC2 response bodies with botocore's own EC2 response parser and the EC2 service model.

stdin: JSON list of {"op": ..., "status": 200|4xx, "body": "<xml>"}; stdout: JSON list of the
parsed dicts (datetimes as ISO 8601 strings).
"""
import json
import sys

import botocore.session
from botocore.parsers import create_parser

model = botocore.session.get_session().get_service_model("ec2")
parser = create_parser("ec2")

out = []
for case in json.load(sys.stdin):
    shape = model.operation_model(case["op"]).output_shape
    parsed = parser.parse({"body": case["body"].encode(), "headers": {}, "status_code": case["status"]}, shape)
    out.append(parsed)
print(json.dumps(out, default=lambda o: o.isoformat() if hasattr(o, "isoformat") else str(o)))
