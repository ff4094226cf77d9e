//! The schema, written once for both engines.
//!
//! Each file of `migrations/` is in SQLite's spelling; PostgreSQL's is derived from it by
//! [`postgres_dialect`]: every integer is 64-bit (`INTEGER` → `BIGINT`, the rowid key →
//! `BIGSERIAL`) and bytes are `BYTEA`. Everything else (tables, checks, partial indexes,
//! `ALTER TABLE … ADD COLUMN`) is SQL both engines read alike; write new files in that common
//! part, so that the one text serves both.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use std::borrow::Cow;

/// `(version, name, SQL)` of every file in `migrations/`, in order (a unit test below checks
/// this list against the directory).
const FILES: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "dashboard",
        include_str!("../../migrations/0002_dashboard.sql"),
    ),
    (
        3,
        "backends_webhooks",
        include_str!("../../migrations/0003_backends_webhooks.sql"),
    ),
    (
        4,
        "models",
        include_str!("../../migrations/0004_models.sql"),
    ),
    (5, "money", include_str!("../../migrations/0005_money.sql")),
];

/// SHA-384 checksums of versions 1 to 3 as PostgreSQL databases recorded them: those versions
/// were first released as a separate PostgreSQL file with other comments, and sqlx refuses to
/// open a database whose applied migration's checksum differs from the embedded one. Their
/// statements are exactly what [`postgres_dialect`] makes of today's files.
const POSTGRES_RELEASED_CHECKSUMS: &[(i64, &str)] = &[
    (1, "e03794b2c26e60603f5c5842a8adfb5939892397222aab18a902f06509e781c1f9664e391c0f54bcb653b6563e5384a8"),
    (2, "cbc563a35dd183d3bf43cd2c7726416a78237932036883c74abe7dc827e10b7ba4123f6692e1307ebfd88966bca71f30"),
    (3, "76147b72831f3d41d05586ed50947911596ecce44d1090f8f6ef265f61466b49c21e3c20c0be518e7ccf90376df984a1"),
];

pub(crate) fn sqlite() -> Migrator {
    migrator(
        FILES
            .iter()
            .map(|(version, name, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*name),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect(),
    )
}

pub(crate) fn postgres() -> Migrator {
    migrator(
        FILES
            .iter()
            .map(|(version, name, sql)| {
                let mut migration = Migration::new(
                    *version,
                    Cow::Borrowed(*name),
                    MigrationType::Simple,
                    Cow::Owned(postgres_dialect(sql)),
                    false,
                );
                if let Some((_, hex)) = POSTGRES_RELEASED_CHECKSUMS
                    .iter()
                    .find(|(v, _)| v == version)
                {
                    migration.checksum = Cow::Owned(from_hex(hex));
                }
                migration
            })
            .collect(),
    )
}

fn migrator(migrations: Vec<Migration>) -> Migrator {
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// PostgreSQL's spelling of a migration: whole words only, so `INTEGER` inside a name is kept.
fn postgres_dialect(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + sql.len() / 8);
    let mut rest = sql;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        if word == "INTEGER" && rest.starts_with(" PRIMARY KEY AUTOINCREMENT") {
            out.push_str("BIGSERIAL PRIMARY KEY");
            rest = &rest[" PRIMARY KEY AUTOINCREMENT".len()..];
        } else {
            out.push_str(match word {
                "INTEGER" => "BIGINT",
                "BLOB" => "BYTEA",
                other => other,
            });
        }
    }
    out.push_str(rest);
    out
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The embedded migrations are exactly the files of `migrations/`, in order: a new file that
    /// is not listed (or a listed one that is gone or renamed) fails here, not in production.
    #[test]
    fn embedded_migrations_are_the_files_of_their_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<(i64, String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
                let (version, name) = stem.split_once('_').unwrap();
                let sql = std::fs::read_to_string(&path).unwrap();
                (version.parse().unwrap(), name.to_owned(), sql)
            })
            .collect();
        files.sort();
        let embedded: Vec<(i64, String, String)> = FILES
            .iter()
            .map(|(v, n, sql)| (*v, (*n).to_owned(), (*sql).to_owned()))
            .collect();
        assert_eq!(embedded, files);
    }

    #[test]
    fn postgres_gets_64_bit_integers_serial_keys_and_bytea() {
        let sql = "CREATE TABLE t (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    n_INTEGER INTEGER NOT NULL,\n    body BLOB\n);\n-- INTEGER in a comment\n";
        assert_eq!(
            postgres_dialect(sql),
            "CREATE TABLE t (\n    id BIGSERIAL PRIMARY KEY,\n    n_INTEGER BIGINT NOT NULL,\n    body BYTEA\n);\n-- BIGINT in a comment\n"
        );
    }

    /// The released checksums stand only for versions 1 to 3; later versions were one text from
    /// the start, and a new file must not be given a checksum its text does not have.
    #[test]
    fn released_checksums_cover_only_the_versions_first_released_apart() {
        let versions: Vec<i64> = POSTGRES_RELEASED_CHECKSUMS
            .iter()
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(versions, [1, 2, 3]);
        for (_, hex) in POSTGRES_RELEASED_CHECKSUMS {
            assert_eq!(from_hex(hex).len(), 48, "SHA-384");
        }
    }
}
