//! A linearizability checker for histories of reads and writes on registers (one register per
//! key; a history is linearizable iff each key's sub-history is, so keys are checked apart).
//!
//! The search is Wing & Gong's with Lowe's memoisation (as in Knossos and Porcupine): pick, in
//! turn, any operation that could take effect next (it was invoked before every pending
//! operation's response), apply it to the register if it agrees (a read must return the current
//! value), recurse; a (set of done operations, register value) pair already seen is not explored
//! again. A write whose outcome is unknown (the client got an error or never heard back) may
//! take effect at any time after its call, or never. Reads that failed are dropped.
//!
//! History text format (one operation per line, `#` comments):
//! `client key w|r value call_ns ret_ns` where `value` is a number (`-` for a read of an empty
//! register) and `ret_ns` is `-` when the outcome is unknown.

use std::collections::{BTreeMap, HashSet};

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Who did it.
    pub client: u32,
    /// Register.
    pub key: String,
    /// Write of a value, or read returning a value (`None`: the register was empty).
    pub kind: Kind,
    /// Invocation time (any monotonic clock shared by the clients).
    pub call: u64,
    /// Response time; `None` if the outcome is unknown.
    pub ret: Option<u64>,
}

/// Operation kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Set the register.
    Write(u64),
    /// Observe the register.
    Read(Option<u64>),
}

/// Parses the text format; errors name the line.
pub fn parse(text: &str) -> Result<Vec<Op>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = |what: &str| format!("line {}: {what}: {line}", n + 1);
        if f.len() != 6 {
            return Err(bad("expected 6 fields"));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad("not a number"));
        let opt = |s: &str| if s == "-" { Ok(None) } else { num(s).map(Some) };
        let kind = match f[2] {
            "w" => Kind::Write(num(f[3])?),
            "r" => Kind::Read(opt(f[3])?),
            _ => return Err(bad("op is w or r")),
        };
        let call = num(f[4])?;
        let ret = opt(f[5])?;
        if ret.is_some_and(|r| r < call) {
            return Err(bad("returns before its call"));
        }
        if matches!(kind, Kind::Read(_)) && ret.is_none() {
            continue; // a read that failed tells nothing
        }
        out.push(Op {
            client: f[0].parse().map_err(|_| bad("client is a number"))?,
            key: f[1].to_string(),
            kind,
            call,
            ret,
        });
    }
    Ok(out)
}

/// Checks every key's sub-history; `Err` names a key whose history has no linearization.
pub fn check(ops: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in ops {
        by_key.entry(&o.key).or_default().push(o);
    }
    for (key, ops) in by_key {
        check_register(&ops).map_err(|e| format!("key {key}: {e}"))?;
    }
    Ok(())
}

/// Search states explored per key before giving up (bounds time and memory).
pub const MAX_STATES: usize = 2_000_000;

/// Largest sub-history checked (the memo holds sets of done operations as bitsets).
pub const MAX_OPS_PER_KEY: usize = 2048;

fn check_register(ops: &[&Op]) -> Result<(), String> {
    if ops.len() > MAX_OPS_PER_KEY {
        return Err(format!(
            "{} operations; at most {MAX_OPS_PER_KEY} per key are checked",
            ops.len()
        ));
    }
    // A write with unknown outcome whose value nobody read can be taken never to have
    // happened: including it could only add a state no read observes (this keeps histories
    // with many failed writes tractable).
    let read_values: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let mut ops: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| {
            !(o.ret.is_none() && matches!(o.kind, Kind::Write(v) if !read_values.contains(&v)))
        })
        .collect();
    ops.sort_by_key(|o| o.call);
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    // Depth-first over (done set, register value), iteratively.
    let mut stack: Vec<(Vec<u64>, Option<u64>)> = vec![(vec![0; words], None)];
    while let Some((done, value)) = stack.pop() {
        if !seen.insert((done.clone(), value)) {
            continue;
        }
        if seen.len() > MAX_STATES {
            return Err(format!(
                "undecided: more than {MAX_STATES} states explored for {n} operations"
            ));
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        // Finished when every operation with a known outcome is done.
        if (0..n).all(|i| is_done(i) || ops[i].ret.is_none()) {
            return Ok(());
        }
        // An operation can go next if it was called before every pending response.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .filter_map(|i| ops[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if is_done(i) || ops[i].call > horizon {
                continue;
            }
            let next = match ops[i].kind {
                Kind::Write(v) => Some(Some(v)),
                Kind::Read(v) if v == value => Some(value),
                Kind::Read(_) => None,
            };
            if let Some(v) = next {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                stack.push((d, v));
            }
        }
    }
    let first_bad = ops
        .iter()
        .find(|o| matches!(o.kind, Kind::Read(_)))
        .map(|o| format!("{o:?}"))
        .unwrap_or_default();
    Err(format!(
        "no linearization of {n} operations (first read: {first_bad})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(text: &str) -> Vec<Op> {
        parse(text).unwrap()
    }

    #[test]
    fn sequential_and_concurrent_histories_that_are_linearizable() {
        // w1 then r1.
        assert!(check(&h("1 x w 1 0 10\n2 x r 1 20 30")).is_ok());
        // Overlapping write and read: the read may see either value.
        assert!(check(&h("1 x w 1 0 10\n1 x w 2 20 40\n2 x r 1 25 30")).is_ok());
        assert!(check(&h("1 x w 1 0 10\n1 x w 2 20 40\n2 x r 2 25 30")).is_ok());
        // Empty register before any write.
        assert!(check(&h("2 x r - 0 5\n1 x w 1 10 20")).is_ok());
        // A write with unknown outcome may have happened...
        assert!(check(&h("1 x w 1 0 10\n1 x w 2 20 -\n2 x r 2 50 60")).is_ok());
        // ...or not.
        assert!(check(&h("1 x w 1 0 10\n1 x w 2 20 -\n2 x r 1 50 60")).is_ok());
    }

    #[test]
    fn histories_that_are_not() {
        // A stale read after the write returned.
        assert!(check(&h("1 x w 1 0 10\n1 x w 2 20 30\n2 x r 1 40 50")).is_err());
        // Reading a value nobody wrote.
        assert!(check(&h("1 x w 1 0 10\n2 x r 7 20 30")).is_err());
        // Two reads disagreeing on order: r2 then r1 after both writes finished.
        assert!(check(&h(
            "1 x w 1 0 10\n2 x w 2 0 10\n3 x r 2 20 30\n3 x r 1 40 50"
        ))
        .is_err());
        // Keys are independent: y's violation is found even though x is fine.
        assert!(check(&h(
            "1 x w 1 0 10\n2 x r 1 20 30\n1 y w 5 0 10\n2 y r - 20 30"
        ))
        .is_err());
    }

    proptest::proptest! {
        /// Histories made by running operations one after another, each stretched around its
        /// moment of effect so neighbours overlap, are accepted; changing a read to a value
        /// nobody wrote is not.
        #[test]
        fn generated_histories(steps in proptest::collection::vec((proptest::prelude::any::<bool>(), 0u64..15, 0u64..15), 1..40)) {
            let mut value = None;
            let mut ops = Vec::new();
            for (k, (write, before, after)) in steps.iter().enumerate() {
                let at = 100 + 10 * k as u64;
                let kind = if *write {
                    value = Some(k as u64);
                    Kind::Write(k as u64)
                } else {
                    Kind::Read(value)
                };
                ops.push(Op { client: k as u32 % 3, key: "x".into(), kind, call: at - before, ret: Some(at + after) });
            }
            proptest::prop_assert!(check(&ops).is_ok());
            if let Some(r) = ops.iter_mut().find(|o| matches!(o.kind, Kind::Read(_))) {
                r.kind = Kind::Read(Some(999));
                proptest::prop_assert!(check(&ops).is_err());
            }
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        assert!(parse("1 x q 1 0 10").is_err());
        assert!(parse("1 x w 1 10 5").is_err());
        assert!(parse("1 x w").is_err());
    }
}
