"""Signs a set of EC2 requests with botocore's own SigV4Auth and prints them as JSON, exactly as
they would go on the wire (method, path, query, headers, body), for the Rust verifier to check.

Usage: sigv4_sign.py ACCESS_KEY_ID SECRET REGION
"""
import json
import sys
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

akid, secret, region = sys.argv[1:4]
creds = Credentials(akid, secret)
FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}

cases = [
    ("describe", dict(method="POST", url="https://ec2.bulkhead.test/",
                      data="Action=DescribeInstances&Version=2016-11-15", headers=dict(FORM))),
    ("run-user-data", dict(method="POST", url="https://ec2.bulkhead.test:8443/",
                           data="Action=RunInstances&ImageId=ami-1&MaxCount=1&MinCount=1"
                                "&UserData=IyEvYmluL3NoCmVjaG8gaGk%3D&Version=2016-11-15",
                           headers=dict(FORM))),
    ("get-query", dict(method="GET", url="https://ec2.bulkhead.test/",
                       params={"Action": "DescribeVolumes", "Version": "2016-11-15",
                               "Filter.1.Name": "size", "Filter.1.Value.1": "10 GiB ~ä",
                               "Filter.1.Value.2": "a+b/c"})),
    ("odd-path-headers", dict(method="POST", url="https://ec2.bulkhead.test/a%20b/./c//d/../",
                              data=b"\x00\xffbinary body\n",
                              headers={**FORM, "X-Amz-Meta-Note": "  several   spaces\tand tab ",
                                       "X-Amz-Target": "x"})),
    ("empty-body", dict(method="POST", url="https://ec2.bulkhead.test/", data=b"",
                        headers=dict(FORM))),
    ("content-sha256", dict(method="POST", url="https://ec2.bulkhead.test/",
                            data="Action=DeleteVolume&Version=2016-11-15&VolumeId=vol-1",
                            headers={**FORM})),
]

out = []
for name, kw in cases:
    req = AWSRequest(**kw)
    if name == "content-sha256":
        import hashlib
        req.headers["X-Amz-Content-SHA256"] = hashlib.sha256(kw["data"].encode()).hexdigest()
    SigV4Auth(creds, "ec2", region).add_auth(req)
    prepared = req.prepare()
    parts = urlsplit(prepared.url)
    headers = [[k, v if isinstance(v, str) else v.decode("latin-1")] for k, v in prepared.headers.items()]
    if not any(k.lower() == "host" for k, _ in headers):
        # What the HTTP client sends: botocore signs exactly this value.
        headers.append(["Host", _host_from_url(prepared.url)])
    body = prepared.body or b""
    if isinstance(body, str):
        body = body.encode()
    out.append({"name": name, "method": prepared.method, "path": parts.path,
                "query": parts.query, "headers": headers, "body_hex": body.hex()})
print(json.dumps(out))
