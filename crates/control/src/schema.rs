//! The control plane's schema, written once for both repositories.
//!
//! Each migration is one SQL text with three type placeholders that differ between the engines:
//! `{BLOB}` (SQLite `BLOB`, PostgreSQL `BYTEA`), `{INT}` (`INTEGER` / `BIGINT`: SQLite's integers
//! are 64-bit already) and `{BOOL}` (`INTEGER` 0/1 / `BOOLEAN`). Everything else — tables,
//! columns, keys, indexes — is the same text, so a column cannot be added to one engine and
//! forgotten in the other. Migration N is applied once, in order, and recorded as schema version
//! N (SQLite `user_version`, PostgreSQL `schema_version`).

/// The SQL engine a migration is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

const BASE: &str = "CREATE TABLE customers (
        access_key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, wrapped_secret {BLOB} NOT NULL);
     CREATE TABLE signatures (signature TEXT PRIMARY KEY, seen {INT} NOT NULL);
     CREATE TABLE idempotency (
        tenant_id TEXT NOT NULL, action TEXT NOT NULL, token TEXT NOT NULL,
        request_hash TEXT NOT NULL, response TEXT NOT NULL,
        PRIMARY KEY (tenant_id, action, token));
     CREATE TABLE hosts (
        host_id TEXT PRIMARY KEY, addr TEXT NOT NULL, cores {INT} NOT NULL,
        dedicated_tenant TEXT, status TEXT, polled {INT}, audit_cursor {INT} NOT NULL DEFAULT 0);
     CREATE TABLE host_audit (
        host_id TEXT NOT NULL, seq {INT} NOT NULL, line TEXT NOT NULL, PRIMARY KEY (host_id, seq));
     CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, host_id TEXT NOT NULL,
        image_id TEXT NOT NULL, vcpus {INT} NOT NULL, memory_mib {INT} NOT NULL,
        cores {INT} NOT NULL, dedicated {BOOL} NOT NULL, state TEXT NOT NULL,
        created {INT} NOT NULL);
     CREATE INDEX instances_by_tenant ON instances(tenant_id);
     CREATE TABLE volumes (
        volume_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, size_gib {INT} NOT NULL,
        kms_key_id TEXT NOT NULL, ciphertext_blob {BLOB} NOT NULL, state TEXT NOT NULL,
        instance_id TEXT, host_id TEXT, created {INT} NOT NULL);
     CREATE INDEX volumes_by_tenant ON volumes(tenant_id);";

/// Every migration, in order (the workflow tables are written in SQL both engines take).
const MIGRATIONS: &[&str] = &[
    BASE,
    crate::workflow::store::SCHEMA,
    crate::workflow::store::LEASES,
    crate::net_store::SCHEMA,
    // Network volumes: the storage node that holds a volume's ciphertext.
    "ALTER TABLE volumes ADD COLUMN storage_node TEXT;",
    // Instance storage: the size of an instance's local ephemeral disk (NULL: none).
    "ALTER TABLE instances ADD COLUMN instance_storage_gib BIGINT;",
    // Snapshots: a copy of a volume's ciphertext on its storage node, in the volume's KMS key
    // family (the same data-key blob).
    "CREATE TABLE snapshots (
        snapshot_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, volume_id TEXT NOT NULL,
        size_gib {INT} NOT NULL, kms_key_id TEXT NOT NULL, ciphertext_blob {BLOB} NOT NULL,
        state TEXT NOT NULL, storage_node TEXT, created {INT} NOT NULL);
     CREATE INDEX snapshots_by_tenant ON snapshots(tenant_id);",
];

/// The migrations rendered for `d`.
pub fn migrations(d: Dialect) -> Vec<String> {
    let (blob, int, boolean) = match d {
        Dialect::Sqlite => ("BLOB", "INTEGER", "INTEGER"),
        Dialect::Postgres => ("BYTEA", "BIGINT", "BOOLEAN"),
    };
    MIGRATIONS
        .iter()
        .map(|m| {
            m.replace("{BLOB}", blob)
                .replace("{INT}", int)
                .replace("{BOOL}", boolean)
        })
        .collect()
}

/// Every table the migrations create, in order (PostgreSQL adds its `schema_version`).
pub fn tables() -> Vec<&'static str> {
    MIGRATIONS
        .iter()
        .flat_map(|m| m.split("CREATE TABLE ").skip(1))
        .filter_map(|rest| rest.split(|c: char| c.is_whitespace() || c == '(').next())
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_every_created_table_once() {
        let t = tables();
        for want in [
            "customers",
            "instances",
            "volumes",
            "workflows",
            "interfaces",
        ] {
            assert!(t.contains(&want), "{want} missing from {t:?}");
        }
        let mut sorted = t.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), t.len(), "{t:?}");
        let created = MIGRATIONS
            .iter()
            .map(|m| m.matches("CREATE TABLE ").count())
            .sum::<usize>();
        assert_eq!(t.len(), created);
    }

    #[test]
    fn both_engines_get_every_table_and_no_placeholder() {
        let s = migrations(Dialect::Sqlite);
        let p = migrations(Dialect::Postgres);
        assert_eq!(s.len(), p.len());
        for m in s.iter().chain(&p) {
            assert!(!m.contains('{') && !m.contains('}'), "{m}");
        }
        assert!(s[0].contains("wrapped_secret BLOB") && p[0].contains("wrapped_secret BYTEA"));
        assert!(s[0].contains("dedicated INTEGER") && p[0].contains("dedicated BOOLEAN"));
        assert!(!p[0].contains("INTEGER"), "PostgreSQL takes BIGINT");
        // The same tables and indexes, in the same order.
        let names = |v: &[String]| -> Vec<String> {
            v.iter()
                .flat_map(|m| m.split(';'))
                .filter_map(|st| st.split('(').next())
                .map(|h| h.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|h| !h.is_empty())
                .collect()
        };
        assert_eq!(names(&s), names(&p));
    }
}
