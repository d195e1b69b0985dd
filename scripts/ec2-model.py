#!/usr/bin/env python3
"""Writes the botocore-style service model of the EC2 Query API subset Bulkhead serves.

Sources, both read, nothing copied by hand:
  - what Bulkhead accepts and answers: the description table in crates/ec2-query
    (`bulkhead_ec2_query::doc::ACTIONS`, printed as JSON by
    `cargo run --release -p bulkhead-ec2-query --example doc-table`, or read from --table FILE);
  - the shapes: botocore's own `ec2` service model (the one the AWS SDK for Python ships).

Every parameter the table lists must be a member botocore serializes under that wire name, and
every answer field must be a member botocore reads at that XML path (except `return` where
botocore models no output), or this script fails. The model keeps, for each operation, only those
members; documentation text from botocore is dropped.

  scripts/ec2-model.py                  write docs/ec2-query-model.json and docs/ec2-query-api.md
  scripts/ec2-model.py --check          fail if the committed files are not what would be written
  scripts/ec2-model.py --botocore-members OP...   print, as JSON, every operation name botocore
                                        knows and every wire parameter of OP (for the tests)
  scripts/ec2-model.py --sample-bodies  print, as JSON, the request bodies botocore's serializer
                                        makes with the committed model for every documented
                                        parameter (for the tests)
  scripts/ec2-model.py --parse-answers  read {op: xml} answers on stdin; fail unless botocore's
                                        parser with the committed model finds exactly the
                                        documented members (for the tests)
"""

import argparse
import copy
import json
import os
import subprocess
import sys

import botocore
import botocore.model
import botocore.session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PATH = os.path.join("docs", "ec2-query-model.json")
MD_PATH = os.path.join("docs", "ec2-query-api.md")
INDEX_LETTERS = ["N", "M", "K", "L"]
SCALARS = {"string", "integer", "long", "boolean", "timestamp", "blob", "double", "float"}
# Bulkhead writes <return>true</return> where EC2 does and botocore models no such member.
UNMODELLED_OK = {"return"}

MISSING = [
    "Tags: `TagSpecification.N` and `tag:` filters are refused; answers carry no `tagSet`.",
    "`MinCount`/`MaxCount` other than 1: the parser takes 1-1000, the control plane refuses any "
    "count but 1 (`InvalidParameterValue`); one instance per call.",
    "Filter values are matched exactly: no `*` or `?` wildcards. Filter names are checked by the "
    "control plane (`crates/control/src/query_map.rs`); others are refused.",
    "Temporary credentials (`X-Amz-Security-Token`) and presigned URLs are refused (`AuthFailure`).",
    "Only `POST /` with a form body: GET requests with parameters in the URL are not parsed; "
    "`Date` is not accepted instead of `X-Amz-Date`.",
    "One availability zone per region; `Placement.AvailabilityZone`/`AvailabilityZone` must name it.",
    "`DeleteSecurityGroup`, egress rules (`Authorize/RevokeSecurityGroupEgress`; every group "
    "answers with the all-traffic egress rule), group pairs, prefix lists and IPv6 ranges in "
    "`IpPermissions` are not served.",
    "Snapshots: `CreateVolume` needs `Size` with `SnapshotId` (EC2 defaults it to the snapshot's "
    "size); a snapshot's `Description` is echoed in the `CreateSnapshot` answer but not kept; "
    "only a detached network volume can be snapshotted (an attached one is `VolumeInUse`); a "
    "snapshot whose `DeleteSnapshot` has not finished is `error` (EC2 has no deleting state; "
    "repeat the delete); `CopySnapshot`, sharing (`ModifySnapshotAttribute`, "
    "`RestorableByUserIds`) and archive tiers are not served.",
    "Everything else EC2 has (images, key pairs, network interfaces, addresses, ...) "
    "answers `InvalidAction`.",
]


def load_table(path):
    if path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "bulkhead-ec2-query", "--example", "doc-table"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE)
    return json.loads(out.stdout)


def load_botocore():
    session = botocore.session.get_session()
    loader = session.get_component("data_loader")
    raw = loader.load_service_model("ec2", "service-2")
    return raw, session.get_service_model("ec2")


def query_name(member_name, member_ref):
    """The EC2 serializer's name for a member (botocore EC2QuerySerializer)."""
    if "queryName" in member_ref:
        return member_ref["queryName"]
    if "locationName" in member_ref:
        name = member_ref["locationName"]
        return name[0].upper() + name[1:]
    return member_name


def input_leaves(raw, shape_name, prefix, depth, path):
    """(wire pattern, member path, scalar type) for every leaf botocore would serialize under
    `prefix` (EC2 lists are flattened: `Name.1`, `Name.2`...; structures are `Name.Member`)."""
    shape = raw["shapes"][shape_name]
    kind = shape["type"]
    if kind == "structure":
        if shape_name in [p[1] for p in path] or len(path) > 8:
            return
        for mname, mref in shape.get("members", {}).items():
            wire = query_name(mname, mref)
            yield from input_leaves(raw, mref["shape"], f"{prefix}.{wire}", depth,
                                    path + ((mname, shape_name),))
    elif kind == "list":
        letter = INDEX_LETTERS[min(depth, len(INDEX_LETTERS) - 1)]
        yield from input_leaves(raw, shape["member"]["shape"], f"{prefix}.{letter}", depth + 1, path)
    else:
        yield prefix, tuple(p[0] for p in path), kind


def input_patterns(raw, shape_name):
    out = []
    for mname, mref in raw["shapes"][shape_name].get("members", {}).items():
        wire = query_name(mname, mref)
        for pattern, mpath, kind in input_leaves(raw, mref["shape"], wire, 0, ((mname, shape_name),)):
            out.append((pattern, mpath, kind))
    return out


def output_nodes(raw, shape_name, prefix=(), path=(), seen=()):
    """(xml path, member path, type) for every member botocore reads, containers included."""
    shape = raw["shapes"][shape_name]
    if shape_name in seen or len(prefix) > 12:
        return
    if shape["type"] == "structure":
        for mname, mref in shape.get("members", {}).items():
            xml = mref.get("locationName", mname)
            mshape = raw["shapes"][mref["shape"]]
            yield ".".join(prefix + (xml,)), path + (mname,), mshape["type"]
            yield from output_nodes(raw, mref["shape"], prefix + (xml,), path + (mname,),
                                    seen + (shape_name,))
    elif shape["type"] == "list":
        item = shape["member"].get("locationName", "member")
        mshape = raw["shapes"][shape["member"]["shape"]]
        yield from output_nodes_struct(raw, shape["member"]["shape"], prefix + (item,), path,
                                       seen + (shape_name,), mshape)


def output_nodes_struct(raw, shape_name, prefix, path, seen, shape):
    if shape["type"] in SCALARS:
        yield ".".join(prefix), path, shape["type"]
    else:
        yield from output_nodes(raw, shape_name, prefix, path, seen)


class Pruner:
    """Emits shapes keeping only the members on the kept paths; names them after botocore's
    shape, with a number added when two uses keep different members."""

    def __init__(self, raw):
        self.raw = raw
        self.shapes = {}

    def emit(self, name, body):
        candidate, n = name, 1
        while candidate in self.shapes and self.shapes[candidate] != body:
            n += 1
            candidate = f"{name}{n}"
        self.shapes[candidate] = body
        return candidate

    def prune(self, shape_name, tree, required_paths=None, prefix=()):
        """`tree`: member name -> subtree of the members kept. `required_paths`: the member paths
        Bulkhead requires (input side); `None` keeps botocore's `required` (output side)."""
        src = self.raw["shapes"][shape_name]
        body = {k: copy.deepcopy(v) for k, v in src.items() if k not in ("documentation", "members", "member", "required")}
        if src["type"] == "structure":
            members = {}
            for mname, mref in src.get("members", {}).items():
                if mname not in tree:
                    continue
                ref = {k: v for k, v in mref.items() if k != "documentation"}
                ref["shape"] = self.prune(mref["shape"], tree[mname] or {}, required_paths,
                                          prefix + (mname,))
                members[mname] = ref
            body["members"] = members
            if required_paths is None:
                required = [r for r in src.get("required", []) if r in members]
            else:
                required = [m for m in members if prefix + (m,) in required_paths]
            if required:
                body["required"] = required
        elif src["type"] == "list":
            ref = {k: v for k, v in src["member"].items() if k != "documentation"}
            ref["shape"] = self.prune(src["member"]["shape"], tree, required_paths, prefix)
            body["member"] = ref
        return self.emit(shape_name, body)


def insert(tree, path):
    node = tree
    for p in path:
        node = node.setdefault(p, {})


def build(table, raw, service):
    pruner = Pruner(raw)
    operations = {}
    rows = []
    common = [p["wire"] for p in table["common_params"]]
    for action in table["actions"]:
        name = action["name"]
        op = raw["operations"].get(name)
        if op is None:
            sys.exit(f"{name}: not an operation of botocore's ec2 model")
        in_shape = op["input"]["shape"]
        by_wire = {}
        for pattern, mpath, kind in input_patterns(raw, in_shape):
            by_wire.setdefault(pattern, (mpath, kind))
        in_tree, params, required_paths = {}, [], set()
        for p in table["common_params"][2:] + action["params"]:
            if not p["in_ec2"]:
                if p["wire"] in by_wire:
                    sys.exit(f"{name}: {p['wire']} is marked not in EC2 but botocore has it")
                params.append(dict(p, member=None, type="string"))
                continue
            if p["wire"] not in by_wire:
                sys.exit(f"{name}: parameter {p['wire']} is not serialized by botocore's model")
            mpath, kind = by_wire[p["wire"]]
            insert(in_tree, mpath)
            if p["required"]:
                required_paths.update(mpath[:i] for i in range(1, len(mpath) + 1))
            params.append(dict(p, member=".".join(mpath), type=kind))
        out_fields, unmodelled = [], []
        out_tree = {}
        out_shape = op.get("output", {}).get("shape")
        nodes = {}
        if out_shape:
            for xml, mpath, kind in output_nodes(raw, out_shape):
                nodes.setdefault(xml, (mpath, kind))
        for field in action["output"]:
            if field in nodes:
                mpath, kind = nodes[field]
                insert(out_tree, mpath)
                out_fields.append({"xml": field, "member": ".".join(mpath), "type": kind})
            elif field in UNMODELLED_OK:
                unmodelled.append(field)
            else:
                sys.exit(f"{name}: answer field {field} is not in botocore's model")
        entry = {k: copy.deepcopy(v) for k, v in op.items() if k not in ("documentation", "input", "output", "errors")}
        entry["input"] = {"shape": pruner.prune(in_shape, in_tree, required_paths)}
        if out_shape:
            entry["output"] = {"shape": pruner.prune(out_shape, out_tree)}
        entry["errors"] = []
        entry["documentation"] = (
            "<p>Errors besides the common ones: " + (", ".join(action["errors"]) or "none") + ".</p>")
        operations[name] = entry
        rows.append({"name": name, "params": params, "output": out_fields,
                     "unmodelled": unmodelled, "errors": action["errors"]})
    model = {
        "version": raw.get("version", "2.0"),
        "metadata": {k: v for k, v in raw["metadata"].items()},
        "documentation": (
            "<p>The subset of the Amazon EC2 Query API that Bulkhead serves: the operations, input "
            "members and output members of botocore " + botocore.__version__ + "'s ec2 model that "
            "bulkhead-ec2-query accepts and writes (doc::ACTIONS), input members marked required "
            "where Bulkhead requires them, generated by "
            "scripts/ec2-model.py. Every operation also takes "
            + ", ".join(common) + " and can answer with: " + ", ".join(table["common_errors"])
            + ".</p>"),
        "operations": operations,
        "shapes": dict(sorted(pruner.shapes.items())),
    }
    return model, rows


def cell(items):
    return "<br>".join(items) if items else "—"


def markdown(table, rows):
    out = [
        "# The EC2 Query API Bulkhead serves",
        "",
        "Generated by `scripts/ec2-model.py` (do not edit): the operations, parameters and answer "
        "fields of [`crates/ec2-query`](../crates/ec2-query/README.md)'s description table "
        "(`doc::ACTIONS`, checked against its parser and XML writer by its unit tests), matched "
        "against botocore's own EC2 service model. The same subset as a botocore service model: "
        "[`ec2-query-model.json`](ec2-query-model.json).",
        "",
        f"Every request is `POST /`, form-encoded, signed with AWS Signature Version 4 (service "
        f"`ec2`), with `Action`, `Version={table['api_version']}` and optionally `DryRun`. Anything "
        "not listed is refused: an unknown action with `InvalidAction`, an unknown parameter with "
        "`UnknownParameter`. `N`/`M` are list indexes (1, 2, 3...). `*` marks a required parameter.",
        "",
        "Every operation can also answer with: " + ", ".join(f"`{c}`" for c in table["common_errors"]) + ".",
        "",
        "| Operation | Accepted parameters | Returned fields | Errors |",
        "|---|---|---|---|",
    ]
    for r in rows:
        params = []
        for p in r["params"]:
            if p["wire"] == "DryRun":
                continue
            if p["member"] is None:
                text = f"`{p['wire']}` (a Bulkhead extension, not in EC2's model)"
            else:
                text = f"`{p['wire']}`{'*' if p['required'] else ''} ({p['member']}: {p['type']})"
            if p["requires"]:
                text += " with " + ", ".join(f"`{x}`" for x in p["requires"])
            params.append(text)
        fields = [f"`{f['xml'].replace('.item', '[]')}`" for f in r["output"]]
        fields += [f"`{f}` (not in botocore's model)" for f in r["unmodelled"]]
        errors = [f"`{e}`" for e in r["errors"]]
        out.append(f"| {r['name']} | {cell(params)} | {cell(fields)} | {cell(errors)} |")
    out += ["", "## EC2 behaviour still missing", ""]
    out += [f"- {m}" for m in MISSING]
    return "\n".join(out) + "\n"


def walk_shape(shape, seen):
    if shape is None or shape.name in seen:
        return
    seen.add(shape.name)
    if shape.type_name == "structure":
        for member in shape.members.values():
            walk_shape(member, seen)
    elif shape.type_name == "list":
        walk_shape(shape.member, seen)


def render(table_path):
    table = load_table(table_path)
    raw, service = load_botocore()
    model, rows = build(table, raw, service)
    # The subset must be a model botocore itself can load: every shape reference resolves.
    check = botocore.model.ServiceModel(copy.deepcopy(model), "ec2")
    for name in check.operation_names:
        op = check.operation_model(name)
        for shape in (op.input_shape, op.output_shape):
            walk_shape(shape, set())
    return json.dumps(model, indent=1, sort_keys=False) + "\n", markdown(table, rows)


def botocore_members(ops):
    raw, _ = load_botocore()
    out = {"operations": sorted(raw["operations"]), "members": {}}
    for op in ops:
        shape = raw["operations"][op]["input"]["shape"]
        out["members"][op] = sorted({p for p, _, _ in input_patterns(raw, shape)})
    json.dump(out, sys.stdout)


def set_member(params, shapes, shape_name, mpath, sample):
    """Puts `sample` at member path `mpath` of a botocore parameter dict (one item per list)."""
    node = params
    for i, m in enumerate(mpath):
        ref = shapes[shape_name]["members"][m]
        child = shapes[ref["shape"]]
        last = i == len(mpath) - 1
        if child["type"] == "list":
            if last:
                node[m] = [scalar(shapes[child["member"]["shape"]]["type"], sample)]
                return
            node = node.setdefault(m, [{}])[0]
            shape_name = child["member"]["shape"]
        elif child["type"] == "structure":
            node = node.setdefault(m, {})
            shape_name = ref["shape"]
        else:
            node[m] = scalar(child["type"], sample)
            return


def scalar(kind, sample):
    if kind in ("integer", "long"):
        return int(sample)
    if kind == "boolean":
        return sample == "true"
    return sample


def sample_bodies(table_path):
    """Serializes, with botocore's EC2 serializer (validating) and the committed subset model,
    each documented parameter with the action's required ones and those it requires."""
    from botocore.awsrequest import create_request_object, prepare_request_dict
    from botocore.serialize import create_serializer

    table = load_table(table_path)
    with open(os.path.join(ROOT, MODEL_PATH), encoding="utf-8") as f:
        raw = json.load(f)
    model = botocore.model.ServiceModel(copy.deepcopy(raw), "ec2")
    serializer = create_serializer("ec2", include_validation=True)
    out = []
    for action in table["actions"]:
        op = model.operation_model(action["name"])
        in_shape = raw["operations"][action["name"]]["input"]["shape"]
        by_wire = {w: m for w, m, _ in input_patterns(raw, in_shape)}
        params = {p["wire"]: p for p in table["common_params"][2:] + action["params"]}
        required = [w for w, p in params.items() if p["required"]]
        for wire, p in params.items():
            if not p["in_ec2"]:
                continue
            chosen = dict.fromkeys(required + [wire] + p["requires"])
            call = {}
            for w in chosen:
                set_member(call, raw["shapes"], in_shape, by_wire[w], params[w]["sample"])
            request = serializer.serialize_to_request(call, op)
            prepare_request_dict(request, endpoint_url="https://ec2.bulkhead.test")
            body = create_request_object(request).prepare().body
            out.append({"op": action["name"], "wire": wire,
                        "body": body.decode() if isinstance(body, bytes) else body})
    json.dump(out, sys.stdout)


def leaf_members(value, path=()):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaf_members(v, path + (k,))
    elif isinstance(value, list) and value:
        yield from leaf_members(value[0], path)
    else:
        yield ".".join(path)


def parse_answers(table_path):
    """Reads {op: xml} on stdin; botocore's EC2 parser, with the committed subset model, must find
    exactly the documented members in each answer."""
    from botocore.parsers import create_parser

    table = load_table(table_path)
    raw, service = load_botocore()
    _, rows = build(table, raw, service)
    with open(os.path.join(ROOT, MODEL_PATH), encoding="utf-8") as f:
        model = botocore.model.ServiceModel(json.load(f), "ec2")
    answers = json.load(sys.stdin)
    failed = False
    for row in rows:
        op = model.operation_model(row["name"])
        want = {f["member"] for f in row["output"]}
        got = set()
        if op.output_shape is not None:
            parsed = create_parser("ec2").parse(
                {"body": answers[row["name"]].encode(), "headers": {}, "status_code": 200},
                op.output_shape)
            parsed.pop("ResponseMetadata", None)
            got = set(leaf_members(parsed)) - {""}
        if got != want:
            print(f"{row['name']}: botocore read {sorted(got)}, documented {sorted(want)}",
                  file=sys.stderr)
            failed = True
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", help="the doc-table JSON (default: run the cargo example)")
    ap.add_argument("--check", action="store_true", help="compare with the committed files")
    ap.add_argument("--botocore-members", nargs="+", metavar="OP")
    ap.add_argument("--sample-bodies", action="store_true",
                    help="print each documented parameter serialized by botocore with the committed model")
    ap.add_argument("--parse-answers", action="store_true",
                    help="parse {op: xml} from stdin with the committed model, compare the members")
    args = ap.parse_args()
    if args.parse_answers:
        return parse_answers(args.table)
    if args.botocore_members:
        return botocore_members(args.botocore_members)
    if args.sample_bodies:
        return sample_bodies(args.table)
    model, md = render(args.table)
    if not args.check:
        for path, text in ((MODEL_PATH, model), (MD_PATH, md)):
            with open(os.path.join(ROOT, path), "w", encoding="utf-8") as f:
                f.write(text)
        return 0
    failed = False
    with open(os.path.join(ROOT, MD_PATH), encoding="utf-8") as f:
        if f.read() != md:
            print(f"{MD_PATH} is stale: run scripts/ec2-model.py", file=sys.stderr)
            failed = True
    with open(os.path.join(ROOT, MODEL_PATH), encoding="utf-8") as f:
        committed = f.read()
    if committed != model:
        old, new = json.loads(committed), json.loads(model)
        if old["operations"].keys() != new["operations"].keys():
            print(f"{MODEL_PATH}: operations differ: run scripts/ec2-model.py", file=sys.stderr)
            failed = True
        elif botocore.__version__ in old["documentation"]:
            print(f"{MODEL_PATH} is stale: run scripts/ec2-model.py", file=sys.stderr)
            failed = True
        else:
            # Another botocore release: the table above is what Bulkhead accepts and it matched
            # (same members, types and XML paths); shapes may have been renamed or re-documented.
            print(f"note: {MODEL_PATH} was written with another botocore; the operations, "
                  f"members and fields still match botocore {botocore.__version__}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
