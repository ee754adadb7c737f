//! The linearizability checker of the Jepsen-style tests (tests/support/linearizability.rs),
//! checked on histories whose answer is known: hand-made ones, and random concurrent histories
//! made from a real register (always linearizable) and then corrupted (a stale read).

#[path = "support/linearizability.rs"]
mod lin;

use lin::{Input, Op, Output, check};

fn op(client: usize, call: u64, ret: Option<u64>, input: Input, output: Option<Output>) -> Op {
    Op { client, call, ret, input, output }
}

fn read(c: usize, call: u64, ret: u64, v: Option<u64>) -> Op {
    op(c, call, Some(ret), Input::Read, Some(Output::Value(v)))
}

fn write(c: usize, call: u64, ret: u64, v: u64) -> Op {
    op(c, call, Some(ret), Input::Write(v), Some(Output::Done(true)))
}

#[test]
fn sequential_histories() {
    assert!(check(&[write(0, 0, 1, 1), read(0, 2, 3, Some(1))]).is_ok());
    assert!(check(&[read(0, 0, 1, None), write(0, 2, 3, 1), read(1, 4, 5, Some(1))]).is_ok());
    // A read after a completed write that misses it.
    assert!(check(&[write(0, 0, 1, 1), read(1, 2, 3, None)]).is_err());
    // A value nobody wrote.
    assert!(check(&[read(0, 0, 1, Some(7))]).is_err());
}

#[test]
fn concurrent_reads_may_see_either_side_but_not_go_back() {
    // The write overlaps both reads: old then new is fine, either alone is fine.
    assert!(check(&[write(0, 0, 10, 1), read(1, 1, 2, None), read(1, 3, 4, Some(1))]).is_ok());
    assert!(check(&[write(0, 0, 10, 1), read(1, 1, 2, Some(1))]).is_ok());
    // New, then (after the first read completed) old again: no order explains it.
    assert!(check(&[write(0, 0, 10, 1), read(1, 1, 2, Some(1)), read(2, 3, 4, None)]).is_err());
}

#[test]
fn compare_and_swap() {
    let cas =
        |c, call, ret, expected, new, ok| op(c, call, Some(ret), Input::Cas { expected, new }, Some(Output::Done(ok)));
    assert!(check(&[write(0, 0, 1, 1), cas(0, 2, 3, Some(1), 2, true), read(0, 4, 5, Some(2))]).is_ok());
    // Two sequential swaps from the same value cannot both succeed.
    assert!(check(&[write(0, 0, 1, 1), cas(0, 2, 3, Some(1), 2, true), cas(1, 4, 5, Some(1), 3, true)]).is_err());
    // Concurrent ones: exactly one may.
    assert!(check(&[write(0, 0, 1, 1), cas(0, 2, 5, Some(1), 2, true), cas(1, 3, 6, Some(1), 3, false)]).is_ok());
    assert!(check(&[write(0, 0, 1, 1), cas(0, 2, 5, Some(1), 2, true), cas(1, 3, 6, Some(1), 3, true)]).is_err());
    // A failed swap when the value matched.
    assert!(check(&[write(0, 0, 1, 1), cas(0, 2, 3, Some(1), 2, false)]).is_err());
    // Create-if-absent.
    assert!(check(&[cas(0, 0, 1, None, 5, true), read(0, 2, 3, Some(5))]).is_ok());
}

#[test]
fn an_operation_without_an_answer_may_or_may_not_have_happened() {
    let lost = op(0, 0, None, Input::Write(1), None);
    assert!(check(&[lost.clone(), read(1, 5, 6, Some(1))]).is_ok());
    assert!(check(&[lost.clone(), read(1, 5, 6, None)]).is_ok());
    // But once seen, it cannot be unseen.
    assert!(check(&[lost, read(1, 5, 6, Some(1)), read(1, 7, 8, None)]).is_err());
}

/// A tiny deterministic generator (xorshift), so the test needs no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A history of `clients` clients against one real register: each operation takes effect at
/// one instant inside its interval. Some answers are lost (the client gave up).
fn real_history(seed: u64, clients: usize, per_client: usize) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    // Each client's operations: consecutive intervals; the effect instant is drawn inside.
    let mut planned = Vec::new();
    let mut next_value = 1;
    for c in 0..clients {
        let mut t = rng.below(5);
        for _ in 0..per_client {
            let call = t;
            let ret = call + 1 + rng.below(20);
            let at = call * 1000 + 1 + rng.below((ret - call) * 1000 - 1);
            let input = match rng.below(3) {
                0 => Input::Read,
                1 => {
                    next_value += 1;
                    Input::Write(next_value)
                }
                _ => {
                    next_value += 1;
                    Input::Cas { expected: None, new: next_value } // `expected` filled in below
                }
            };
            planned.push((at, c, call, ret, input));
            t = ret + rng.below(3);
        }
    }
    planned.sort_by_key(|p| p.0);
    let mut state: Option<u64> = None;
    let mut ops = Vec::new();
    for (i, (_, c, call, ret, input)) in planned.into_iter().enumerate() {
        let (input, output) = match input {
            Input::Read => (Input::Read, Output::Value(state)),
            Input::Write(v) => {
                state = Some(v);
                (Input::Write(v), Output::Done(true))
            }
            Input::Cas { new, .. } => {
                // Expect the current value half the time (it succeeds), another one otherwise.
                let expected = if i % 2 == 0 { state } else { Some(new + 1_000_000) };
                let ok = expected == state;
                if ok {
                    state = Some(new);
                }
                (Input::Cas { expected, new }, Output::Done(ok))
            }
        };
        let lost = rng.below(40) == 0;
        ops.push(Op {
            client: c,
            call: call * 1000,
            ret: (!lost).then_some(ret * 1000),
            input,
            output: (!lost).then_some(output),
        });
    }
    ops
}

#[test]
fn random_histories_of_a_real_register_are_linearizable_and_a_future_read_is_caught() {
    let mut caught = 0;
    for seed in 0..200 {
        let mut ops = real_history(seed, 5, 20);
        if let Err(e) = check(&ops) {
            panic!("seed {seed}: a real register's history was refused: {e}");
        }
        // Corrupt: an early read now sees a value that a write invoked only after the read
        // had returned wrote (a read from the future), which no order explains.
        let future = |ret: u64, ops: &[Op]| {
            ops.iter().find_map(|w| match w.input {
                Input::Write(v) if w.call > ret && w.ret.is_some() => Some(v),
                _ => None,
            })
        };
        let pick = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| o.input == Input::Read && o.ret.is_some())
            .find_map(|(i, o)| future(o.ret.unwrap(), &ops).map(|v| (i, v)));
        if let Some((i, v)) = pick {
            ops[i].output = Some(Output::Value(Some(v)));
            assert!(check(&ops).is_err(), "seed {seed}: a read from the future was accepted");
            caught += 1;
        }
    }
    assert!(caught > 150, "corrupted histories checked: {caught}");
}
