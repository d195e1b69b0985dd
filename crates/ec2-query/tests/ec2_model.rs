//! The published model of the Query API (`docs/ec2-query-model.json`, `docs/ec2-query-api.md`)
//! cannot go stale: `scripts/ec2-model.py --check` regenerates both from this crate's description
//! table (`doc::ACTIONS`) and botocore's own EC2 model and compares them with the committed files;
//! and every operation and input member botocore's model has that the table does not list is run
//! through the parser and must be refused.

#[allow(dead_code)] // run_json and script are for the other botocore tests.
mod common;

use std::path::Path;
use std::process::Command;

use bulkhead_ec2_query::doc::{self, ActionDoc, COMMON_PARAMS};
use bulkhead_ec2_query::{Ec2Request, QueryError};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("crates/ec2-query is two levels below the repository")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `Action`, `Version`, the action's required parameters, and `extra`.
fn body(a: &ActionDoc, extra: &[(String, &str)]) -> String {
    let mut out = format!(
        "Action={}&Version={}",
        a.name,
        bulkhead_ec2_query::form::API_VERSION
    );
    let required = a
        .params
        .iter()
        .filter(|p| p.required)
        .map(|p| (doc::first_key(p.wire), p.sample));
    for (k, v) in required.chain(extra.iter().cloned()) {
        out.push_str(&format!("&{}={}", encode(&k), encode(v)));
    }
    out
}

#[test]
fn committed_model_is_what_the_script_writes() {
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let table = std::env::temp_dir().join(format!(
        "bulkhead-ec2-doc-table-{}.json",
        std::process::id()
    ));
    std::fs::write(&table, doc::table_json()).expect("write the table");
    let out = Command::new(python)
        .arg(repo_root().join("scripts/ec2-model.py"))
        .arg("--table")
        .arg(&table)
        .arg("--check")
        .current_dir(repo_root())
        .output()
        .expect("run scripts/ec2-model.py");
    let _ = std::fs::remove_file(&table);
    assert!(
        out.status.success(),
        "docs/ec2-query-model.json or docs/ec2-query-api.md is stale (run scripts/ec2-model.py): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nothing_botocore_models_beyond_the_table_is_accepted() {
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let names: Vec<&str> = doc::ACTIONS.iter().map(|a| a.name).collect();
    let out = Command::new(python)
        .arg(repo_root().join("scripts/ec2-model.py"))
        .arg("--botocore-members")
        .args(&names)
        .output()
        .expect("run scripts/ec2-model.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let operations = v["operations"].as_array().expect("operations");
    assert!(
        operations.len() > 500,
        "botocore's EC2 model has hundreds of operations"
    );
    let mut refused_actions = 0;
    for op in operations {
        let op = op.as_str().expect("a name");
        if doc::action(op).is_some() {
            continue;
        }
        let body = format!(
            "Action={op}&Version={}",
            bulkhead_ec2_query::form::API_VERSION
        );
        match Ec2Request::parse(body.as_bytes()) {
            Err(QueryError::UnknownAction) => refused_actions += 1,
            other => panic!("{op} is not in doc::ACTIONS but the parser gives {other:?}"),
        }
    }
    let mut refused_members = 0;
    for a in doc::ACTIONS {
        let members = v["members"][a.name]
            .as_array()
            .expect("members of a documented action");
        for wire in members {
            let wire = wire.as_str().expect("a wire name");
            if a.params.iter().chain(COMMON_PARAMS).any(|p| p.wire == wire) {
                continue;
            }
            let body = body(a, &[(doc::first_key(wire), "1")]);
            match Ec2Request::parse(body.as_bytes()) {
                Err(QueryError::UnknownParameter) => refused_members += 1,
                other => panic!(
                    "{}: {wire} is not documented but the parser gives {other:?}",
                    a.name
                ),
            }
        }
        // And the documented ones, with only the required ones besides, are accepted.
        assert!(
            Ec2Request::parse(body(a, &[]).as_bytes()).is_ok(),
            "{}",
            a.name
        );
    }
    eprintln!("refused {refused_actions} other botocore actions and {refused_members} undocumented members");
    assert!(refused_members > 100);
}

#[test]
fn botocore_with_the_committed_model_sends_what_the_parser_accepts() {
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let table = std::env::temp_dir().join(format!(
        "bulkhead-ec2-doc-table-samples-{}.json",
        std::process::id()
    ));
    std::fs::write(&table, doc::table_json()).expect("write the table");
    let out = Command::new(python)
        .arg(repo_root().join("scripts/ec2-model.py"))
        .arg("--table")
        .arg(&table)
        .arg("--sample-bodies")
        .output()
        .expect("run scripts/ec2-model.py");
    let _ = std::fs::remove_file(&table);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let documented: usize = doc::ACTIONS
        .iter()
        .map(|a| a.params.iter().filter(|p| p.in_ec2).count() + 1)
        .sum();
    assert_eq!(cases.len(), documented, "one body per documented parameter");
    for case in &cases {
        let (op, wire, body) = (
            case["op"].as_str().expect("op"),
            case["wire"].as_str().expect("wire"),
            case["body"].as_str().expect("body"),
        );
        let key = doc::first_key(wire);
        assert!(
            body.split('&')
                .any(|kv| kv.split('=').next() == Some(key.as_str())),
            "{op}: botocore did not send {key}: {body}"
        );
        let call = Ec2Request::parse(body.as_bytes())
            .unwrap_or_else(|e| panic!("{op} {wire}: botocore's body {body} refused: {e}"));
        assert_eq!(call.request.action(), op);
    }
}

#[test]
fn botocore_with_the_committed_model_reads_every_documented_field() {
    use std::io::Write;
    let Some(python) = common::python_with_botocore() else {
        return;
    };
    let mut answers = serde_json::Map::new();
    for a in doc::ACTIONS {
        let r = doc::example_response(a.name).expect("an example answer for every action");
        answers.insert(a.name.to_owned(), r.to_xml("req-1").into());
    }
    let table = std::env::temp_dir().join(format!(
        "bulkhead-ec2-doc-table-answers-{}.json",
        std::process::id()
    ));
    std::fs::write(&table, doc::table_json()).expect("write the table");
    let mut child = Command::new(python)
        .arg(repo_root().join("scripts/ec2-model.py"))
        .arg("--table")
        .arg(&table)
        .arg("--parse-answers")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run scripts/ec2-model.py");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(serde_json::Value::Object(answers).to_string().as_bytes())
        .expect("write answers");
    let out = child.wait_with_output().expect("script ran");
    let _ = std::fs::remove_file(&table);
    assert!(
        out.status.success(),
        "botocore's parser with docs/ec2-query-model.json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
