"""Serializes EC2 calls with botocore's own EC2 Query serializer and its EC2 service model, and
prints each request body exactly as botocore would send it.

stdin: JSON list of {"op": "RunInstances", "params": {...}}; stdout: JSON list of body strings.
"""
import json
import sys

import botocore.session
from botocore.awsrequest import create_request_object, prepare_request_dict
from botocore.serialize import create_serializer

model = botocore.session.get_session().get_service_model("ec2")
assert model.metadata["protocol"] == "ec2", model.metadata["protocol"]
serializer = create_serializer("ec2", include_validation=True)

bodies = []
for case in json.load(sys.stdin):
    op = model.operation_model(case["op"])
    request_dict = serializer.serialize_to_request(case["params"], op)
    prepare_request_dict(request_dict, endpoint_url="https://ec2.bulkhead.test")
    prepared = create_request_object(request_dict).prepare()
    body = prepared.body
    if isinstance(body, bytes):
        body = body.decode()
    bodies.append(body)
print(json.dumps(bodies))
