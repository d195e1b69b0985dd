//! The VPC API against the real daemons (control plane, KMS, token service, two host
//! controllers): CRUD and its checks, a second tenant attacking every operation with the first
//! tenant's ids, private addresses (unique, released on terminate, reused), the default VPC,
//! and DescribeInstances' network fields.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn id(v: &Value, path: &[&str]) -> String {
    let mut x = v;
    for p in path {
        x = match p.parse::<usize>() {
            Ok(n) => &x[n],
            Err(_) => &x[*p],
        };
    }
    x.as_str()
        .unwrap_or_else(|| panic!("{path:?} in {v}"))
        .to_string()
}

fn refused(c: &Customer, action: &str, body: Value, status: u16, want: &str) {
    let (st, v) = c.call(action, body.clone());
    assert_eq!((st, code(&v)), (status, want), "{action} {body}: {v}");
}

/// Everything tenant `c` can see of its network.
fn snapshot(c: &Customer) -> Value {
    json!({
        "vpcs": c.ok("DescribeVpcs", json!({})),
        "subnets": c.ok("DescribeSubnets", json!({})),
        "groups": c.ok("DescribeSecurityGroups", json!({})),
    })
}

#[test]
fn vpc_crud_checks_every_value_and_changes_nothing_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");

    let vpc = a.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"}));
    let vpc_id = id(&vpc, &["Vpc", "VpcId"]);
    assert!(vpc_id.starts_with("vpc-"), "{vpc}");
    assert_eq!(vpc["Vpc"]["CidrBlock"], "10.0.0.0/16");
    assert_eq!(vpc["Vpc"]["IsDefault"], false);
    let before = snapshot(&a);
    // Every VPC has its default group.
    let groups = before["groups"]["SecurityGroups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["GroupName"], "default");
    assert_eq!(groups[0]["VpcId"], json!(vpc_id));
    // It lets in what comes from the VPC's own block (AWS: from its own members).
    assert_eq!(
        groups[0]["IpPermissions"],
        json!([{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}])
    );

    for (cidr, want) in [
        ("10.0.0.0/8", "bad_prefix_length"),
        ("10.0.0.0/29", "bad_prefix_length"),
        ("10.0.0.1/16", "cidr_has_host_bits"),
        ("10.0.0.0", "bad_cidr"),
    ] {
        refused(&a, "CreateVpc", json!({"CidrBlock": cidr}), 400, want);
    }
    refused(
        &a,
        "CreateVpc",
        json!({"CidrBlock": "10.0.0.0/16", "TenantId": "tenant-b"}),
        400,
        "body_unknown_field",
    );
    assert_eq!(snapshot(&a), before, "nothing was made by a refused call");

    let sub = a.ok(
        "CreateSubnet",
        json!({"VpcId": vpc_id, "CidrBlock": "10.0.1.0/24"}),
    );
    let subnet_id = id(&sub, &["Subnet", "SubnetId"]);
    assert!(subnet_id.starts_with("subnet-"));
    assert_eq!(sub["Subnet"]["VpcId"], json!(vpc_id));
    // 256 addresses less the 5 AWS reserves.
    assert_eq!(sub["Subnet"]["AvailableIpAddressCount"], 251);
    let before = snapshot(&a);
    for (cidr, status, want) in [
        ("10.0.1.128/25", 409, "cidr_conflict"),
        ("10.0.0.0/16", 409, "cidr_conflict"),
        ("10.1.0.0/24", 400, "cidr_outside_vpc"),
        ("10.0.2.0/29", 400, "bad_prefix_length"),
    ] {
        refused(
            &a,
            "CreateSubnet",
            json!({"VpcId": vpc_id, "CidrBlock": cidr}),
            status,
            want,
        );
    }
    refused(
        &a,
        "CreateSubnet",
        json!({"VpcId": "vpc-0000000000000000", "CidrBlock": "10.0.2.0/24"}),
        404,
        "no_such_vpc",
    );
    assert_eq!(snapshot(&a), before, "no refused subnet was made");

    let sg = a.ok(
        "CreateSecurityGroup",
        json!({"GroupName": "web", "VpcId": vpc_id, "Description": "web tier"}),
    );
    let group_id = id(&sg, &["GroupId"]);
    assert!(group_id.starts_with("sg-"));
    refused(
        &a,
        "CreateSecurityGroup",
        json!({"GroupName": "web", "VpcId": vpc_id}),
        409,
        "duplicate_group_name",
    );
    let rule = json!({"GroupId": group_id, "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 7000, "ToPort": 7000, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]});
    a.ok("AuthorizeSecurityGroupIngress", rule.clone());
    refused(
        &a,
        "AuthorizeSecurityGroupIngress",
        rule.clone(),
        409,
        "duplicate_rule",
    );
    refused(
        &a,
        "AuthorizeSecurityGroupIngress",
        json!({"GroupId": group_id, "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 9, "ToPort": 8, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]}),
        400,
        "bad_port_range",
    );
    let g = a.ok("DescribeSecurityGroups", json!({"GroupIds": [group_id]}));
    assert_eq!(
        g["SecurityGroups"][0]["IpPermissions"],
        json!([{"IpProtocol": "tcp", "FromPort": 7000, "ToPort": 7000, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}])
    );
    assert_eq!(g["SecurityGroups"][0]["GroupName"], "web");
    a.ok("RevokeSecurityGroupIngress", rule.clone());
    refused(&a, "RevokeSecurityGroupIngress", rule, 400, "no_such_rule");
    let g = a.ok("DescribeSecurityGroups", json!({"GroupIds": [group_id]}));
    assert_eq!(g["SecurityGroups"][0]["IpPermissions"], json!([]));

    refused(
        &a,
        "DeleteVpc",
        json!({"VpcId": vpc_id}),
        409,
        "vpc_has_subnets",
    );
    a.ok("DeleteSubnet", json!({"SubnetId": subnet_id}));
    a.ok("DeleteVpc", json!({"VpcId": vpc_id}));
    let after = snapshot(&a);
    assert_eq!(after["vpcs"]["Vpcs"], json!([]));
    assert_eq!(
        after["groups"]["SecurityGroups"],
        json!([]),
        "the VPC's groups went with it"
    );
    refused(
        &a,
        "DescribeVpcs",
        json!({"VpcIds": [vpc_id]}),
        404,
        "no_such_vpc",
    );
}

#[test]
fn another_tenant_can_neither_see_nor_touch_a_vpc_subnet_or_group() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    let b = customer(&c, "tenant-b");
    let vpc = id(
        &a.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    let subnet = id(
        &a.ok(
            "CreateSubnet",
            json!({"VpcId": vpc, "CidrBlock": "10.0.1.0/24"}),
        ),
        &["Subnet", "SubnetId"],
    );
    let group = id(
        &a.ok(
            "CreateSecurityGroup",
            json!({"GroupName": "web", "VpcId": vpc}),
        ),
        &["GroupId"],
    );
    let rule = |g: &str| {
        json!({"GroupId": g, "IpPermissions": [
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]})
    };
    a.ok("AuthorizeSecurityGroupIngress", rule(&group));
    let ai = a.ok(
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": subnet, "SecurityGroupIds": [group]}),
    );
    let a_instance = id(&ai, &["Instances", "0", "InstanceId"]);
    let a_before = snapshot(&a);

    // b sees none of it.
    let bs = snapshot(&b);
    assert_eq!(bs["vpcs"]["Vpcs"], json!([]));
    assert_eq!(bs["subnets"]["Subnets"], json!([]));
    assert_eq!(bs["groups"]["SecurityGroups"], json!([]));
    // And every operation with a's ids answers as if they did not exist.
    refused(
        &b,
        "DescribeVpcs",
        json!({"VpcIds": [vpc]}),
        404,
        "no_such_vpc",
    );
    refused(&b, "DeleteVpc", json!({"VpcId": vpc}), 404, "no_such_vpc");
    refused(
        &b,
        "CreateSubnet",
        json!({"VpcId": vpc, "CidrBlock": "10.0.2.0/24"}),
        404,
        "no_such_vpc",
    );
    refused(
        &b,
        "DescribeSubnets",
        json!({"SubnetIds": [subnet]}),
        404,
        "no_such_subnet",
    );
    refused(
        &b,
        "DeleteSubnet",
        json!({"SubnetId": subnet}),
        404,
        "no_such_subnet",
    );
    refused(
        &b,
        "CreateSecurityGroup",
        json!({"GroupName": "evil", "VpcId": vpc}),
        404,
        "no_such_vpc",
    );
    refused(
        &b,
        "DescribeSecurityGroups",
        json!({"GroupIds": [group]}),
        404,
        "no_such_security_group",
    );
    refused(
        &b,
        "RevokeSecurityGroupIngress",
        rule(&group),
        404,
        "no_such_security_group",
    );
    let tcp = json!({"GroupId": group, "IpPermissions": [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]});
    refused(
        &b,
        "AuthorizeSecurityGroupIngress",
        tcp,
        404,
        "no_such_security_group",
    );
    // b cannot put an instance into a's subnet, nor into a's group from its own subnet.
    refused(
        &b,
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": subnet}),
        404,
        "no_such_subnet",
    );
    let bvpc = id(
        &b.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    let bsub = id(
        &b.ok(
            "CreateSubnet",
            json!({"VpcId": bvpc, "CidrBlock": "10.0.1.0/24"}),
        ),
        &["Subnet", "SubnetId"],
    );
    refused(
        &b,
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": bsub, "SecurityGroupIds": [group]}),
        404,
        "no_such_security_group",
    );
    // b's own VPC may reuse a's block; its addresses are its own.
    let bi = b.ok(
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": bsub}),
    );
    assert_eq!(bi["Instances"][0]["PrivateIpAddress"], "10.0.1.4");
    assert_eq!(bi["Instances"][0]["VpcId"], json!(bvpc));
    assert_ne!(
        bi["Instances"][0]["MacAddress"],
        ai["Instances"][0]["MacAddress"]
    );
    // b's instances list has only its own.
    let bl = b.ok("DescribeInstances", json!({}));
    assert!(bl["Instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["InstanceId"] != json!(a_instance)));
    // Nothing of a's changed.
    assert_eq!(snapshot(&a), a_before);
}

#[test]
fn instances_get_unique_private_addresses_released_on_terminate_and_a_default_vpc() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    let b = customer(&c, "tenant-b");

    // First RunInstances without a subnet: the default VPC, subnet and group are made.
    let i1 = a.ok("RunInstances", json!({"ImageId": "img-1"}));
    let i1 = &i1["Instances"][0];
    assert_eq!(i1["PrivateIpAddress"], "172.31.0.4", "{i1}");
    let vpcs = a.ok("DescribeVpcs", json!({}))["Vpcs"].clone();
    assert_eq!(vpcs.as_array().unwrap().len(), 1);
    assert_eq!(vpcs[0]["CidrBlock"], "172.31.0.0/16");
    assert_eq!(vpcs[0]["IsDefault"], true);
    assert_eq!(i1["VpcId"], vpcs[0]["VpcId"]);
    let subnets = a.ok("DescribeSubnets", json!({}))["Subnets"].clone();
    assert_eq!(subnets[0]["CidrBlock"], "172.31.0.0/20");
    assert_eq!(subnets[0]["DefaultForAz"], true);
    assert_eq!(i1["SubnetId"], subnets[0]["SubnetId"]);
    assert_eq!(i1["SecurityGroups"][0]["GroupName"], "default");
    let mac = i1["MacAddress"].as_str().unwrap();
    assert!(mac.starts_with("02:"), "{mac}");

    // (The cluster's two hosts have one core each: at most two instances live at once.)
    // The next instance: the next address, the same default VPC, another MAC.
    let i2 = a.ok("RunInstances", json!({"ImageId": "img-1"}));
    let i2 = &i2["Instances"][0];
    assert_eq!(i2["PrivateIpAddress"], "172.31.0.5");
    assert_eq!(i2["VpcId"], i1["VpcId"]);
    assert_ne!(i2["MacAddress"], i1["MacAddress"]);
    assert_eq!(
        a.ok("DescribeVpcs", json!({}))["Vpcs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (id1, id2) = (id(i1, &["InstanceId"]), id(i2, &["InstanceId"]));
    // DescribeInstances shows the same fields.
    let d = a.ok("DescribeInstances", json!({"InstanceIds": [id2]}));
    assert_eq!(d["Instances"][0]["PrivateIpAddress"], "172.31.0.5");
    assert_eq!(d["Instances"][0]["SubnetId"], subnets[0]["SubnetId"]);
    assert_eq!(d["Instances"][0]["MacAddress"], i2["MacAddress"]);

    // The default subnet cannot be deleted while instances use it.
    let sub = id(&subnets[0], &["SubnetId"]);
    refused(
        &a,
        "DeleteSubnet",
        json!({"SubnetId": sub}),
        409,
        "subnet_in_use",
    );
    let s = a.ok("DescribeSubnets", json!({"SubnetIds": [sub]}));
    assert_eq!(s["Subnets"][0]["AvailableIpAddressCount"], 4091 - 2);
    // Terminating releases the address; the next instance gets the lowest free one again.
    a.ok("TerminateInstances", json!({"InstanceIds": [id1]}));
    let d = a.ok("DescribeInstances", json!({"InstanceIds": [id1]}));
    assert!(d["Instances"][0].get("PrivateIpAddress").is_none(), "{d}");
    let i3 = a.ok("RunInstances", json!({"ImageId": "img-1"}));
    assert_eq!(i3["Instances"][0]["PrivateIpAddress"], "172.31.0.4");
    let id3 = id(&i3, &["Instances", "0", "InstanceId"]);
    a.ok("TerminateInstances", json!({"InstanceIds": [id2, id3]}));
    let s = a.ok("DescribeSubnets", json!({"SubnetIds": [sub]}));
    assert_eq!(s["Subnets"][0]["AvailableIpAddressCount"], 4091);

    // Another tenant's default VPC is its own, with the same block and addresses.
    let bi = b.ok("RunInstances", json!({"ImageId": "img-1"}));
    assert_eq!(bi["Instances"][0]["PrivateIpAddress"], "172.31.0.4");
    assert_ne!(bi["Instances"][0]["VpcId"], i1["VpcId"]);
    b.ok(
        "TerminateInstances",
        json!({"InstanceIds": [id(&bi, &["Instances", "0", "InstanceId"])]}),
    );

    // A named subnet and group; a group of another VPC is refused before anything is placed.
    let vpc = id(
        &a.ok("CreateVpc", json!({"CidrBlock": "10.9.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    let small = id(
        &a.ok(
            "CreateSubnet",
            json!({"VpcId": vpc, "CidrBlock": "10.9.0.0/28"}),
        ),
        &["Subnet", "SubnetId"],
    );
    let web = id(
        &a.ok(
            "CreateSecurityGroup",
            json!({"GroupName": "web", "VpcId": vpc}),
        ),
        &["GroupId"],
    );
    let default_group = id(&i1["SecurityGroups"][0], &["GroupId"]);
    let n_before = a.ok("DescribeInstances", json!({}))["Instances"]
        .as_array()
        .unwrap()
        .len();
    refused(
        &a,
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": small, "SecurityGroupIds": [default_group]}),
        400,
        "security_group_in_other_vpc",
    );
    assert_eq!(
        a.ok("DescribeInstances", json!({}))["Instances"]
            .as_array()
            .unwrap()
            .len(),
        n_before,
        "a refused RunInstances leaves no instance"
    );
    refused(
        &a,
        "RunInstances",
        json!({"ImageId": "img-1", "SecurityGroupIds": [web]}),
        400,
        "security_group_in_other_vpc",
    );
    let w = a.ok(
        "RunInstances",
        json!({"ImageId": "img-1", "SubnetId": small, "SecurityGroupIds": [web]}),
    );
    assert_eq!(w["Instances"][0]["PrivateIpAddress"], "10.9.0.4");
    assert_eq!(
        w["Instances"][0]["SecurityGroups"],
        json!([{"GroupId": web, "GroupName": "web"}])
    );
    let wid = id(&w, &["Instances", "0", "InstanceId"]);
    a.ok("TerminateInstances", json!({"InstanceIds": [wid]}));
    a.ok("DeleteSubnet", json!({"SubnetId": small}));
    a.ok("DeleteVpc", json!({"VpcId": vpc}));
}

/// The hosts' audit records of `op` naming `instance`.
fn host_calls(dir: &std::path::Path, op: &str, instance: &str) -> usize {
    let mut n = 0;
    for h in ["host-1", "host-2"] {
        let text = std::fs::read_to_string(dir.join(h).join("audit.log")).unwrap_or_default();
        n += text
            .lines()
            .filter_map(|l| serde_json::from_str::<bulkhead_audit::AuditRecord>(l).ok())
            .filter(|r| {
                r.entry.kind == bulkhead_audit::EntryKind::Request
                    && r.entry.op == op
                    && r.entry.decision == bulkhead_audit::Decision::Allow
                    && r.entry.resources.iter().any(|x| x.contains(instance))
            })
            .count();
    }
    n
}

#[test]
fn the_vpc_key_is_made_the_card_launched_and_routes_and_rules_reach_the_running_cards() {
    let dir = tempfile::tempdir().unwrap();
    let c = up(dir.path(), false);
    let a = customer(&c, "tenant-a");
    let vpc = id(
        &a.ok("CreateVpc", json!({"CidrBlock": "10.0.0.0/16"})),
        &["Vpc", "VpcId"],
    );
    // The KMS made the VPC's key under the customer's own CreateVpc.
    let kms = std::fs::read_to_string(dir.path().join("kms/audit.log")).unwrap();
    assert!(
        kms.lines()
            .filter_map(|l| serde_json::from_str::<bulkhead_audit::AuditRecord>(l).ok())
            .any(|r| r.entry.op == "CreateVpcKey"
                && r.entry.decision == bulkhead_audit::Decision::Allow
                && r.entry.resources.iter().any(|x| x == &format!("vpc:{vpc}"))),
        "no CreateVpcKey for {vpc} in the KMS audit"
    );
    let subnet = id(
        &a.ok(
            "CreateSubnet",
            json!({"VpcId": vpc, "CidrBlock": "10.0.1.0/24"}),
        ),
        &["Subnet", "SubnetId"],
    );
    let web = id(
        &a.ok(
            "CreateSecurityGroup",
            json!({"GroupName": "web", "VpcId": vpc}),
        ),
        &["GroupId"],
    );
    let run = || {
        id(
            &a.ok(
                "RunInstances",
                json!({"ImageId": "img-1", "SubnetId": subnet, "SecurityGroupIds": [web]}),
            ),
            &["Instances", "0", "InstanceId"],
        )
    };
    let i1 = run();
    // The Network step: the host launched the card with a sealed key.
    assert_eq!(host_calls(dir.path(), "AttachNetwork", &i1), 1);
    let i2 = run();
    assert_eq!(host_calls(dir.path(), "AttachNetwork", &i2), 1);
    // The first card was told about the second instance.
    assert!(host_calls(dir.path(), "SetNetworkRoutes", &i1) >= 1);
    // An ingress change reaches both running cards, no restart.
    let before = (
        host_calls(dir.path(), "SetNetworkRules", &i1),
        host_calls(dir.path(), "SetNetworkRules", &i2),
    );
    a.ok(
        "AuthorizeSecurityGroupIngress",
        json!({"GroupId": web, "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 7000, "ToPort": 7000, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}]}),
    );
    assert_eq!(
        (
            host_calls(dir.path(), "SetNetworkRules", &i1),
            host_calls(dir.path(), "SetNetworkRules", &i2)
        ),
        (before.0 + 1, before.1 + 1)
    );
    // Terminating one tells the other card (its route is gone).
    let routes_before = host_calls(dir.path(), "SetNetworkRoutes", &i2);
    a.ok("TerminateInstances", json!({"InstanceIds": [i1]}));
    assert_eq!(
        host_calls(dir.path(), "SetNetworkRoutes", &i2),
        routes_before + 1
    );
    a.ok("TerminateInstances", json!({"InstanceIds": [i2]}));
}
