//! Reading callgrind's output (its documented "callgrind format"): the total instruction count
//! of a dump and each function's own share of it, the two figures
//! `sidelane-bench --instructions` reports.
use std::collections::HashMap;

use anyhow::Context as _;

/// One dump's instructions: in all, and spent in each function's own code (callees not
/// included), largest first.
#[derive(Debug, PartialEq)]
pub struct Profile {
    pub total: u64,
    pub by_function: Vec<(String, u64)>,
}

/// Parses a dump made with callgrind's default events (`Ir` only) and one position column
/// (`positions: line`, the default).
pub fn parse(text: &str) -> anyhow::Result<Profile> {
    // Function names are written once, as `fn=(id) name`, and afterwards as `fn=(id)`; `cfn=`
    // (a callee) shares the same numbering.
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut own: HashMap<&str, u64> = HashMap::new();
    let mut current: Option<&str> = None;
    let mut total = None;
    // The cost line after `calls=` is the call's inclusive cost: the callee's, not the
    // caller's own.
    let mut after_call = false;
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("totals:")
            .or_else(|| line.strip_prefix("summary:"))
        {
            total = Some(first_number(rest).context("a totals line without a number")?);
            continue;
        }
        let (is_callee, spec) = match (line.strip_prefix("fn="), line.strip_prefix("cfn=")) {
            (Some(spec), _) => (false, spec),
            (None, Some(spec)) => (true, spec),
            (None, None) => {
                if line.starts_with("calls=") {
                    after_call = true;
                } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
                    let cost = line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse::<u64>().ok());
                    if std::mem::take(&mut after_call) {
                        continue;
                    }
                    if let (Some(f), Some(cost)) = (current, cost) {
                        *own.entry(f).or_default() += cost;
                    }
                }
                continue;
            }
        };
        let (id, name) = match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, name)) => (id, name.trim()),
            None => (spec, spec),
        };
        if !name.is_empty() {
            names.entry(id).or_insert(name);
        }
        if !is_callee {
            current = Some(id);
        }
    }
    let mut by_function: Vec<(String, u64)> = own
        .into_iter()
        .map(|(id, cost)| (names.get(id).copied().unwrap_or(id).to_owned(), cost))
        .collect();
    by_function.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total = total.unwrap_or_else(|| by_function.iter().map(|f| f.1).sum());
    Ok(Profile { total, by_function })
}

fn first_number(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape callgrind writes: compressed names, a call with its inclusive cost, relative
    /// positions.
    const DUMP: &str = "# callgrind format
version: 1
positions: line
events: Ir
summary: 1000

ob=(1) /bin/daemon
fl=(1) src/main.rs
fn=(1) main
10 100
+2 50
cfn=(2) parse
calls=3 20
12 600
-1 25

fn=(2) parse
20 580
cfl=(2) libc
cfn=(3) memcpy
calls=1 0
21 20

fn=(3)
0 20
fn=(1)
* 5
totals: 1000
";

    #[test]
    fn own_cost_excludes_what_callees_spent() {
        let p = parse(DUMP).expect("parses");
        assert_eq!(p.total, 1000);
        assert_eq!(
            p.by_function,
            vec![
                ("parse".to_owned(), 580),
                ("main".to_owned(), 180),
                ("memcpy".to_owned(), 20),
            ]
        );
    }

    #[test]
    fn a_dump_without_totals_adds_up_its_functions() {
        let p = parse("fn=(1) f\n1 7\n2 3\n").expect("parses");
        assert_eq!(p.total, 10);
    }
}
