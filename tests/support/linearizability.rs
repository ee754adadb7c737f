//! A linearizability checker for histories of a key-value register (Wing & Gong's search with
//! Lowe's memoization, as in Porcupine and Knossos), for the Jepsen-style tests.
//!
//! A history is the operations clients ran against one key: each with the time it was invoked,
//! the time its answer came back (or none: the client gave up, so it may or may not have taken
//! effect), what it asked and what it got. The history is linearizable if there is one order of
//! the operations that respects real time (an operation that completed before another was
//! invoked comes first), in which every completed operation's answer is what a single register
//! would have answered; an operation without an answer may be placed anywhere after its
//! invocation, or left out.
//!
//! Writes carry unique values, so a compare-and-swap on Consul's `ModifyIndex` is modelled as a
//! compare-and-swap on the value the client read together with that index.

use std::collections::HashSet;

/// What a client asked of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A read.
    Read,
    /// A write of a (unique) value.
    Write(u64),
    /// Replace the value if it is still `expected` (`None`: the key is absent).
    Cas { expected: Option<u64>, new: u64 },
}

/// What the key answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A read's value (`None`: absent).
    Value(Option<u64>),
    /// A write, or whether a compare-and-swap happened.
    Done(bool),
}

/// One operation of a history.
#[derive(Clone, Debug)]
pub struct Op {
    /// Which client ran it (for reports).
    pub client: usize,
    /// When it was invoked (any monotonic unit).
    pub call: u64,
    /// When its answer arrived; `None` if it never did.
    pub ret: Option<u64>,
    /// What it asked.
    pub input: Input,
    /// What it got (`None` with `ret == None`).
    pub output: Option<Output>,
}

/// The register: `state` before, the operation's answer; the state after, if the answer is one
/// the register could give.
fn step(state: Option<u64>, input: &Input, output: Option<&Output>) -> Option<Option<u64>> {
    match (input, output) {
        (Input::Read, None) => Some(state),
        (Input::Read, Some(Output::Value(v))) => (*v == state).then_some(state),
        (Input::Write(v), None | Some(Output::Done(true))) => Some(Some(*v)),
        (Input::Cas { expected, new }, None) => Some(if state == *expected { Some(*new) } else { state }),
        (Input::Cas { expected, new }, Some(Output::Done(ok))) => match (*ok, state == *expected) {
            (true, true) => Some(Some(*new)),
            (false, false) => Some(state),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the history of one key (starting absent) is linearizable.
pub fn check(history: &[Op]) -> Result<(), String> {
    // By invocation: the candidates at each step are a prefix of what is not placed yet.
    let mut sorted = history.to_vec();
    sorted.sort_by_key(|o| o.call);
    let ops = &sorted[..];
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let completed: Vec<usize> = (0..n).filter(|&i| ops[i].ret.is_some()).collect();
    // An explicit stack (the depth is the history's length): (done set, state, next candidate).
    let mut done = vec![0u64; words];
    let mut state: Option<u64> = None;
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new(); // (op linearized, state before it)
    let mut next_candidate = 0usize;
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    let mut explored = 0u64;
    loop {
        if completed.iter().all(|&i| is_done(&done, i)) {
            return Ok(());
        }
        explored += 1;
        if explored > 20_000_000 {
            return Err(format!("gave up after {explored} steps on {n} operations"));
        }
        // The earliest answer among operations not yet placed bounds what can go next.
        let bound = (0..n).filter(|&i| !is_done(&done, i)).filter_map(|i| ops[i].ret).min().unwrap_or(u64::MAX);
        let mut advanced = false;
        let mut i = next_candidate;
        while i < n && ops[i].call <= bound {
            if !is_done(&done, i)
                && let Some(after) = step(state, &ops[i].input, ops[i].output.as_ref())
            {
                let mut with = done.clone();
                with[i / 64] |= 1 << (i % 64);
                if cache.insert((with.clone(), after)) {
                    stack.push((i, state));
                    done = with;
                    state = after;
                    next_candidate = 0;
                    advanced = true;
                    break;
                }
            }
            i += 1;
        }
        if advanced {
            continue;
        }
        // Nothing fits here: undo the last placement and try its next sibling.
        let Some((last, before)) = stack.pop() else {
            return Err(describe(ops));
        };
        done[last / 64] &= !(1 << (last % 64));
        state = before;
        next_candidate = last + 1;
    }
}

fn describe(ops: &[Op]) -> String {
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by_key(|o| o.call);
    let lines: Vec<String> = sorted
        .iter()
        .take(60)
        .map(|o| {
            let ret = o.ret.map_or("?".into(), |r| r.to_string());
            format!("  client {} [{}, {}] {:?} -> {:?}", o.client, o.call, ret, o.input, o.output)
        })
        .collect();
    format!("not linearizable ({} operations; the first 60 by invocation):\n{}", ops.len(), lines.join("\n"))
}
