//! One transaction interface over the store's two databases: SQLite (one machine, the default)
//! and PostgreSQL (fleet mode). The store's queries are written once, against [`Tx`].
//!
//! Invariants:
//! - SQL is written in the common subset of both dialects, with numbered parameters `?1`, `?2`,
//!   … (SQLite's syntax); the PostgreSQL side rewrites them to `$1`, `$2`, … ([`to_pg`]), outside
//!   string literals only.
//! - Values cross in rusqlite's types ([`Value`], `ToSql`/`FromSql`), so the records' own
//!   conversions (`State`, `SwapKind`, JSON columns) serve both databases. On PostgreSQL a
//!   parameter is encoded for the type the server inferred for it ([`PgParam`]): an integer into
//!   `BIGINT`, `INTEGER` or `DOUBLE PRECISION`, a real into `DOUBLE PRECISION`, text into `TEXT`,
//!   `NULL` into anything; anything else is an error naming the type, never a silent cast.
//! - Result rows come back as `Vec<Value>` in column order, read by [`get`].

use postgres::types::{IsNull, ToSql as PgToSql, Type};
use rusqlite::types::{FromSql, Value, ValueRef};
use rusqlite::ToSql;

use super::super::{Error, Result};
use super::rows::sql;

/// Which database a [`Tx`] runs on, for the few expressions the dialects spell differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

/// A transaction on either database.
pub(super) trait Tx {
    /// The database's dialect.
    fn dialect(&self) -> Dialect;
    /// Runs a statement; returns the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[&dyn ToSql]) -> Result<usize>;
    /// Runs a query; returns every row's values in column order.
    fn query(&mut self, sql: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Value>>>;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, params: &[&dyn ToSql]) -> Result<Option<Vec<Value>>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

/// Column `i` of `row` as `T` (the records' `FromSql` conversions); a missing column or a
/// value of the wrong type is a `Corrupt` error naming the column.
pub(super) fn get<T: FromSql>(row: &[Value], i: usize) -> Result<T> {
    let v = row.get(i).ok_or_else(|| Error::Corrupt {
        what: format!("column {i}"),
        message: format!("the row has {} columns", row.len()),
    })?;
    T::column_result(ValueRef::from(v)).map_err(|e| Error::Corrupt {
        what: format!("column {i}"),
        message: e.to_string(),
    })
}

fn values(params: &[&dyn ToSql]) -> Result<Vec<Value>> {
    params
        .iter()
        .map(|p| {
            let out = p.to_sql().map_err(sql("encode a parameter"))?;
            Ok(match out {
                rusqlite::types::ToSqlOutput::Borrowed(r) => match r {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Integer(i),
                    ValueRef::Real(x) => Value::Real(x),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                },
                rusqlite::types::ToSqlOutput::Owned(v) => v,
                _ => {
                    return Err(Error::invalid(
                        "parameter",
                        "a value kind the store does not write",
                    ))
                }
            })
        })
        .collect()
}

impl Tx for rusqlite::Transaction<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<usize> {
        let mut stmt = self.prepare_cached(q).map_err(sql(op_of(q)))?;
        stmt.execute(params).map_err(sql(op_of(q)))
    }

    fn query(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Value>>> {
        let mut stmt = self.prepare_cached(q).map_err(sql(op_of(q)))?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(params, |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
            .map_err(sql(op_of(q)))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql(op_of(q)))
    }
}

/// The operation a statement performs, for its errors ("insert takedown", "read versions"):
/// its verb and the table it names.
pub(super) fn op_of(q: &str) -> &'static str {
    const TABLES: [(&str, &str, &str, &str); 6] = [
        // (table, insert, update, read)
        (
            "takedowns",
            "insert takedown",
            "update takedown",
            "read takedowns",
        ),
        ("events", "insert event", "update event", "read events"),
        (
            "versions",
            "insert version",
            "update version",
            "read versions",
        ),
        (
            "current_version",
            "set the current version",
            "move the current version",
            "read the current version",
        ),
        ("swaps", "record a swap", "update a swap", "read swaps"),
        (
            "lethe_schema",
            "set the schema version",
            "set the schema version",
            "read the schema version",
        ),
    ];
    let words: Vec<String> = q
        .split(|c: char| c.is_whitespace() || c == '(' || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let after = |kw: &str| {
        words
            .iter()
            .position(|w| w == kw)
            .and_then(|i| words.get(i + 1))
    };
    let verb = words.first().map_or("", String::as_str);
    let table = match verb {
        "insert" => after("into"),
        "update" => words.get(1),
        "select" => after("from"),
        "notify" => return "notify the replicas",
        _ => None,
    };
    let Some(t) = table.and_then(|t| TABLES.iter().find(|e| e.0 == t)) else {
        return if verb == "select" { "query" } else { "execute" };
    };
    match verb {
        "insert" => t.1,
        "update" => t.2,
        _ => t.3,
    }
}

/// `?N` placeholders → `$N`, outside single-quoted literals.
pub(super) fn to_pg(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 8);
    let mut quoted = false;
    let mut chars = q.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A rusqlite [`Value`] bound as a PostgreSQL parameter (module docs).
#[derive(Debug)]
pub(super) struct PgParam(pub Value);

impl PgToSql for PgParam {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (&self.0, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Integer(i), &Type::INT8) => PgToSql::to_sql(i, ty, out),
            (Value::Integer(i), &Type::INT4) => PgToSql::to_sql(&i32::try_from(*i)?, ty, out),
            (Value::Integer(i), &Type::FLOAT8) => PgToSql::to_sql(&(*i as f64), ty, out),
            (Value::Real(x), &Type::FLOAT8) => PgToSql::to_sql(x, ty, out),
            (Value::Text(s), &Type::TEXT | &Type::VARCHAR) => PgToSql::to_sql(&s.as_str(), ty, out),
            (v, ty) => Err(format!("cannot bind {v:?} as PostgreSQL type {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// Maps a PostgreSQL error to the store's, naming the operation and the server's message.
pub(crate) fn pg(op: &'static str) -> impl FnOnce(postgres::Error) -> Error {
    move |source| Error::Postgres {
        op,
        message: source
            .as_db_error()
            .map_or_else(|| source.to_string(), ToString::to_string),
        source,
    }
}

/// A PostgreSQL row's values as rusqlite [`Value`]s.
fn pg_row(row: &postgres::Row) -> Result<Vec<Value>> {
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_();
            let v = match *ty {
                Type::INT8 => row
                    .try_get::<_, Option<i64>>(i)
                    .map(|v| v.map(Value::Integer)),
                Type::INT4 => row
                    .try_get::<_, Option<i32>>(i)
                    .map(|v| v.map(|x| Value::Integer(x.into()))),
                Type::BOOL => row
                    .try_get::<_, Option<bool>>(i)
                    .map(|v| v.map(|x| Value::Integer(x.into()))),
                Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map(|v| v.map(Value::Real)),
                Type::TEXT | Type::VARCHAR => row
                    .try_get::<_, Option<String>>(i)
                    .map(|v| v.map(Value::Text)),
                _ => {
                    return Err(Error::Corrupt {
                        what: format!("column {}", row.columns()[i].name()),
                        message: format!("PostgreSQL type {ty} is not one the store reads"),
                    })
                }
            }
            .map_err(pg("read a column"))?;
            Ok(v.unwrap_or(Value::Null))
        })
        .collect()
}

impl Tx for postgres::Transaction<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<usize> {
        let vals: Vec<PgParam> = values(params)?.into_iter().map(PgParam).collect();
        let refs: Vec<&(dyn PgToSql + Sync)> =
            vals.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        let n =
            postgres::Transaction::execute(self, to_pg(q).as_str(), &refs).map_err(pg(op_of(q)))?;
        Ok(n as usize)
    }

    fn query(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Value>>> {
        let vals: Vec<PgParam> = values(params)?.into_iter().map(PgParam).collect();
        let refs: Vec<&(dyn PgToSql + Sync)> =
            vals.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        postgres::Transaction::query(self, to_pg(q).as_str(), &refs)
            .map_err(pg(op_of(q)))?
            .iter()
            .map(pg_row)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_statements_operation() {
        for (q, op) in [
            (
                "INSERT INTO takedowns (id, state) VALUES (?1, ?2)",
                "insert takedown",
            ),
            (
                "UPDATE takedowns SET state = ?1 WHERE id = ?2",
                "update takedown",
            ),
            (
                "SELECT seq, sequences FROM takedowns WHERE seq > ?1",
                "read takedowns",
            ),
            ("SELECT COUNT(*) FROM events", "read events"),
            (
                "INSERT INTO swaps(from_version) VALUES (?1)",
                "record a swap",
            ),
            (
                "select version from current_version where one = 1",
                "read the current version",
            ),
            ("NOTIFY lethe_store", "notify the replicas"),
            ("SELECT 1", "query"),
            ("VACUUM", "execute"),
        ] {
            assert_eq!(op_of(q), op, "{q}");
        }
    }

    #[test]
    fn placeholders_are_rewritten_outside_literals_only() {
        assert_eq!(
            to_pg("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12 AND e IS ?"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12 AND e IS ?"
        );
    }

    /// The same statements through both databases give the same rows.
    #[test]
    fn both_databases_answer_the_same_queries_alike() {
        let Some(server) = crate::test_util::pg::PgServer::start() else {
            return;
        };
        let url = server.new_database("tx_alike");
        let mut pgc = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        pgc.batch_execute(
            "CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL, x DOUBLE PRECISION, \
             one INTEGER, s TEXT)",
        )
        .unwrap();
        let mut lite = rusqlite::Connection::open_in_memory().unwrap();
        lite.execute_batch(
            "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL, x REAL, one INTEGER, s TEXT)",
        )
        .unwrap();
        let run = |tx: &mut dyn Tx| -> Vec<Vec<Value>> {
            let none: Option<String> = None;
            assert_eq!(
                tx.execute(
                    "INSERT INTO t (id, n, x, one, s) VALUES (?1, ?2, ?3, ?4, ?5)",
                    &[&"a", &7i64, &1.5f64, &1i64, &none],
                )
                .unwrap(),
                1
            );
            tx.execute(
                "INSERT INTO t (id, n, x, one, s) VALUES (?1, ?2, ?3, ?4, ?5)",
                &[&"b", &-2i64, &none, &none, &"it's"],
            )
            .unwrap();
            // An integer where a real is stored, and a parameter used twice.
            tx.execute(
                "UPDATE t SET x = ?1, n = n + ?2 WHERE id = ?3 OR n = ?2",
                &[&3i64, &1i64, &"b"],
            )
            .unwrap();
            tx.query("SELECT id, n, x, one, s FROM t ORDER BY id", &[])
                .unwrap()
        };
        let mut lt = lite.transaction().unwrap();
        let a = run(&mut lt);
        lt.commit().unwrap();
        let mut pt = pgc.transaction().unwrap();
        let b = run(&mut pt);
        pt.commit().unwrap();
        assert_eq!(a, b);
        assert_eq!(get::<String>(&a[1], 4).unwrap(), "it's");
        assert_eq!(get::<f64>(&a[1], 2).unwrap(), 3.0);
        assert!(get::<i64>(&a[0], 9).is_err());
        // A value of a type the server did not infer is an error naming it, not a cast.
        let mut pt = pgc.transaction().unwrap();
        let e = Tx::execute(&mut pt, "UPDATE t SET n = ?1", &[&"seven"]).unwrap_err();
        let chain = format!("{e} / {:?}", std::error::Error::source(&e));
        assert!(chain.contains("int8"), "{chain}");
    }
}
