//! Prints the description table of the Query API this crate accepts and answers
//! ([`bulkhead_ec2_query::doc::ACTIONS`]) as JSON, for `scripts/ec2-model.py`.

fn main() {
    print!("{}", bulkhead_ec2_query::doc::table_json());
}
