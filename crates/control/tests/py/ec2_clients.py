"""Drives a Bulkhead control plane with boto3 (the AWS SDK for Python, unmodified from PyPI) and
with raw botocore-signed requests, and prints what it saw as JSON (the Rust test asserts on it).

Environment: BH_ENDPOINT (https://HOST:PORT), AWS_CA_BUNDLE, BH_REGION, BH_A_KEY, BH_A_SECRET,
BH_B_KEY, BH_B_SECRET.

Usage: ec2_clients.py run | flow INSTANCE_ID | refusals | sign-attach VOLUME INSTANCE MODE
"""
import datetime
import http.client
import json
import os
import ssl
import sys
import time
from urllib.parse import urlsplit

import boto3
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

ENDPOINT = os.environ["BH_ENDPOINT"]
REGION = os.environ["BH_REGION"]
AZ = REGION + "a"
CA = os.environ["AWS_CA_BUNDLE"]
KEYS = {
    "a": (os.environ["BH_A_KEY"], os.environ["BH_A_SECRET"]),
    "b": (os.environ["BH_B_KEY"], os.environ["BH_B_SECRET"]),
}
USER_DATA = ("while [ ! -e /sys/block/vda ]; do sleep 1; done\n"
             "echo disk-appeared-$(cat /sys/block/vda/size)\n")


def ec2(who):
    akid, secret = KEYS[who]
    return boto3.client("ec2", endpoint_url=ENDPOINT, region_name=REGION,
                        aws_access_key_id=akid, aws_secret_access_key=secret, verify=CA,
                        config=Config(retries={"max_attempts": 1}))


def code_of(fn, **kw):
    try:
        fn(**kw)
    except ClientError as e:
        return e.response["Error"]["Code"]
    return "ok"


def wait_console(c, instance, needle, limit=900):
    start = time.time()
    while True:
        out = c.get_console_output(InstanceId=instance).get("Output", "")
        if needle in out:
            return out
        if time.time() - start > limit:
            raise SystemExit(f"no {needle!r} on {instance}'s console:\n{out}")
        time.sleep(2)


def run():
    r = ec2("a").run_instances(ImageId="test-guest", MinCount=1, MaxCount=1,
                               InstanceType="t3.nano", UserData=USER_DATA)
    inst = r["Instances"][0]
    return {"instance": inst["InstanceId"], "state": inst["State"]["Name"],
            "reservation": r["ReservationId"]}


def flow(instance):
    a, b = ec2("a"), ec2("b")
    out = {}
    boot = time.time()
    wait_console(a, instance, "BULKHEAD-GUEST-READY")
    out["boot_secs"] = round(time.time() - boot, 1)
    running = a.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]},
                                            {"Name": "instance-id", "Values": [instance]}])
    out["running_filter"] = [i["InstanceId"] for r in running["Reservations"] for i in r["Instances"]]
    stopped = a.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["stopped"]}])
    out["stopped_filter"] = [i["InstanceId"] for r in stopped["Reservations"] for i in r["Instances"]]
    v = a.create_volume(Size=1, AvailabilityZone=AZ, Encrypted=True)
    vol = v["VolumeId"]
    out["volume"] = {"id": vol, "encrypted": v["Encrypted"], "kms_key": bool(v.get("KmsKeyId")),
                     "state": v["State"]}
    att = a.attach_volume(VolumeId=vol, InstanceId=instance, Device="/dev/sdf")
    out["attach_state"] = att["State"]
    console = wait_console(a, instance, "disk-appeared-")
    out["disk_line"] = [l for l in console.splitlines() if "disk-appeared-" in l][-1].strip()
    by_instance = a.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance]}])
    out["attached_filter"] = [(x["VolumeId"], x["State"]) for x in by_instance["Volumes"]]
    # Tenant B sees none of A's resources and gets AWS's codes acting on them.
    out["b_instances"] = b.describe_instances()["Reservations"]
    out["b_volumes"] = b.describe_volumes()["Volumes"]
    out["b_codes"] = {
        "DescribeInstances": code_of(b.describe_instances, InstanceIds=[instance]),
        "GetConsoleOutput": code_of(b.get_console_output, InstanceId=instance),
        "StopInstances": code_of(b.stop_instances, InstanceIds=[instance]),
        "TerminateInstances": code_of(b.terminate_instances, InstanceIds=[instance]),
        "AttachVolume": code_of(b.attach_volume, VolumeId=vol, InstanceId=instance, Device="/dev/sdg"),
        "DetachVolume": code_of(b.detach_volume, VolumeId=vol),
        "DeleteVolume": code_of(b.delete_volume, VolumeId=vol),
        "DescribeVolumes": code_of(b.describe_volumes, VolumeIds=[vol]),
    }
    out["delete_attached"] = code_of(a.delete_volume, VolumeId=vol)
    a.detach_volume(VolumeId=vol)
    out["after_detach"] = a.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"]
    # SigV4 has no nonce: a byte-identical DeleteVolume signed in the same second as an earlier
    # one (a mutating action) has the same signature and is refused as a replay. A new second
    # makes it a new request. (Reads may repeat.)
    time.sleep(1.1)
    a.delete_volume(VolumeId=vol)
    out["after_delete"] = code_of(a.describe_volumes, VolumeIds=[vol])
    # Pagination as the SDK's paginators use it.
    made = [a.create_volume(Size=1, AvailabilityZone=AZ)["VolumeId"] for _ in range(6)]
    pages = list(a.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": 5}))
    out["volume_pages"] = [len(p["Volumes"]) for p in pages]
    out["paged_all"] = sorted(x["VolumeId"] for p in pages for x in p["Volumes"]) == sorted(made)
    out["size_filter"] = len(a.describe_volumes(Filters=[{"Name": "status", "Values": ["available"]}])["Volumes"])
    for m in made:
        a.delete_volume(VolumeId=m)
    # VPC, subnet and security-group operations.
    vpc = a.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    sub = a.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24", AvailabilityZone=AZ)["Subnet"]["SubnetId"]
    sg = a.create_security_group(GroupName="web", Description="front end", VpcId=vpc)["GroupId"]
    perm = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]
    a.authorize_security_group_ingress(GroupId=sg, IpPermissions=perm)
    time.sleep(1.1)  # byte-identical to the call above: a new second
    out["dup_rule"] = code_of(a.authorize_security_group_ingress, GroupId=sg, IpPermissions=perm)
    g = a.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                            {"Name": "group-name", "Values": ["web"]}])
    out["group"] = [(x["GroupId"], x["IpPermissions"][0]["FromPort"],
                     x["IpPermissions"][0]["IpRanges"][0]["CidrIp"]) for x in g["SecurityGroups"]]
    a.revoke_security_group_ingress(GroupId=sg, IpPermissions=perm)
    out["subnets_of_vpc"] = [s["SubnetId"] for s in a.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]]
    out["b_vpc_codes"] = {
        "DeleteSubnet": code_of(b.delete_subnet, SubnetId=sub),
        "DeleteVpc": code_of(b.delete_vpc, VpcId=vpc),
        "DescribeSecurityGroups": code_of(b.describe_security_groups, GroupIds=[sg]),
    }
    out["vpc_in_use"] = code_of(a.delete_vpc, VpcId=vpc)
    a.delete_subnet(SubnetId=sub)
    time.sleep(1.1)  # the refused DeleteVpc above was byte-identical: a new second
    a.delete_vpc(VpcId=vpc)
    out["vpc_gone"] = code_of(a.describe_vpcs, VpcIds=[vpc])
    out["dry_run"] = code_of(a.describe_instances, DryRun=True)
    out["unknown_action"] = raw_code("a", "Action=RebootInstances&Version=2016-11-15&InstanceId.1=" + instance)
    out["wrong_version"] = raw_code("a", "Action=DescribeInstances&Version=2014-01-01")
    out["duplicate"] = raw_code("a", "Action=DescribeVolumes&Version=2016-11-15&VolumeId.1=vol-1&VolumeId.1=vol-2")
    return out


def signed(who, body, secret=None, shift_secs=0):
    """A botocore-signed POST / (method, path, headers, body), optionally signed at another time
    or with another secret."""
    akid, real = KEYS[who]
    req = AWSRequest(method="POST", url=ENDPOINT + "/", data=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    now = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: now() + datetime.timedelta(seconds=shift_secs)
    try:
        SigV4Auth(Credentials(akid, secret or real), "ec2", REGION).add_auth(req)
    finally:
        botocore.auth.get_current_datetime = now
    p = req.prepare()
    headers = dict(p.headers.items())
    headers.setdefault("Host", urlsplit(ENDPOINT).netloc)
    data = p.body if isinstance(p.body, bytes) else (p.body or "").encode()
    return headers, data


def with_length(headers, body):
    h = {k: v for k, v in headers.items() if k.lower() != "content-length"}
    h["Content-Length"] = str(len(body))
    return h


def send(headers, body):
    u = urlsplit(ENDPOINT)
    ctx = ssl.create_default_context(cafile=CA)
    c = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=60)
    c.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
    for k, v in with_length(headers, body).items():
        c.putheader(k, v)
    c.endheaders(body)
    r = c.getresponse()
    text = r.read().decode()
    code = text.split("<Code>")[1].split("</Code>")[0] if "<Code>" in text else "ok"
    return r.status, code


def raw_code(who, body):
    return send(*signed(who, body))[1]


def count_volumes():
    return len(ec2("a").describe_volumes()["Volumes"])


def refusals():
    create = f"Action=CreateVolume&Version=2016-11-15&Size=1&AvailabilityZone={AZ}"
    before = count_volumes()
    out = {}
    h, b = signed("a", create)
    out["first"] = send(h, b)
    out["replay"] = send(h, b)
    out["past"] = send(*signed("a", create, shift_secs=-900))
    out["future"] = send(*signed("a", create, shift_secs=900))
    h, b = signed("a", create)
    out["body_changed"] = send(h, b.replace(b"Size=1", b"Size=9"))
    out["other_secret"] = send(*signed("a", create, secret="x" * 44))
    out["b_key_a_secret"] = send(*signed("b", create, secret=KEYS["a"][1]))
    h, b = signed("a", create)
    del h["Authorization"]
    out["unsigned"] = send(h, b)
    # A read signed once may be sent again (a polling loop or an SDK retry within one second):
    # it changes nothing, so it is answered, unlike the CreateVolume replay above.
    h, b = signed("a", "Action=DescribeVolumes&Version=2016-11-15")
    out["read_repeat"] = [send(h, b), send(h, b)]
    out["volumes_made"] = count_volumes() - before
    return out


def sign_attach(volume, instance, mode):
    """A signed AttachVolume as the control plane forwards it to the KMS: intact, with its body
    changed after signing, or signed with another secret."""
    body = (f"Action=AttachVolume&Version=2016-11-15&VolumeId={volume}"
            f"&InstanceId={instance}&Device=%2Fdev%2Fsdf")
    h, b = signed("a", body, secret="y" * 44 if mode == "other-secret" else None)
    if mode == "body-changed":
        b = b.replace(b"Device=%2Fdev%2Fsdf", b"Device=%2Fdev%2Fsdg")
    headers = [[k, v] for k, v in h.items()]
    return {"sigv4": {"method": "POST", "path": "/", "query": "", "headers": headers,
                      "body": b.decode()}}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "run":
        result = run()
    elif cmd == "flow":
        result = flow(sys.argv[2])
    elif cmd == "refusals":
        result = refusals()
    elif cmd == "sign-attach":
        result = sign_attach(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(result))
