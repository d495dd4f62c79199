//! What one engine step runs, decided without a model: which running sequences contribute a
//! decode row, which a prefill chunk and how long, and which logits each needs back. It is a
//! pure function of the sequences' progress, the step's budget and whose turn it is, so the
//! scheduling rules are tested here alone.
//!
//! The budget bounds a step's time, not just its tokens: a token at position `p` costs
//! `1 + p / attention_span` token-equivalents ([`Cost`]), because its attention reads every
//! earlier position. So the chunk a long prompt gets shrinks as its context grows, every step
//! takes about as long, and a request that arrives during a long prefill waits for at most
//! one such step before its own prompt runs.
//!
//! The rules: every decoding sequence gets its row first (decode rows are what users wait on
//! token by token), then prefill chunks fill what is left of the budget, shortest remaining
//! prompt first, so a short prompt is never queued behind a long one. A prompt passed over for
//! [`STARVED_STEPS`] steps in a row goes first, so a stream of short prompts cannot starve a
//! long one. Ties go in turn from `cursor`, which the scheduler moves every step, so when the
//! budget is smaller than the batch every sequence still gets its turn.

use std::ops::Range;

use crate::model::Logits;

/// Steps a prompt in prefill may get nothing before it goes first.
pub const STARVED_STEPS: usize = 4;

/// Where one running sequence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub prompt_len: usize,
    /// Prompt tokens already in its KV cache.
    pub prefilled: usize,
    /// It has a sampled token to feed (it is decoding).
    pub decoding: bool,
    /// It wants a distribution after every prompt token (echo with logprobs).
    pub prompt_logprobs: bool,
    /// Tokens in its KV cache (prompt and generated).
    pub context: usize,
    /// Steps in a row it was in prefill and got no chunk.
    pub passed_over: usize,
    /// Drafted tokens its decode row feeds after the pending one (`crate::speculate`).
    pub draft: usize,
}

impl Progress {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt_len
    }
}

/// What a token costs a step: 1 for the work every token does (the projections), plus its
/// attention, which grows with its position: `attention_span` is the context length at which
/// attention costs as much as the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub attention_span: f64,
}

impl Cost {
    /// Token-equivalents of `n` tokens at positions `start..start + n`.
    pub fn tokens(&self, start: usize, n: usize) -> f64 {
        let (s, n) = (start as f64, n as f64);
        n + (n * s + n * (n - 1.0) / 2.0) / self.attention_span
    }

    /// The most tokens from position `start` (up to `limit`) that cost at most `budget`.
    fn fit(&self, start: usize, limit: usize, budget: f64) -> usize {
        let (mut lo, mut hi) = (0, limit);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.tokens(start, mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Its pending token, and its draft if it has one (`Progress::draft`).
    Decode,
    /// These prompt positions.
    Prefill(Range<usize>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The sequence's index in the running set.
    pub seq: usize,
    pub work: Work,
    pub logits: Logits,
}

/// A step: rows in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub rows: Vec<Row>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Tokens the step processes.
    pub fn tokens(&self) -> usize {
        self.rows
            .iter()
            .map(|r| match &r.work {
                Work::Decode => 1,
                Work::Prefill(range) => range.len(),
            })
            .sum()
    }
}

/// Plans one step over `seqs` within `budget` token-equivalents, turns starting at `cursor`.
/// A step always makes progress: if nothing fits, the first prompt in line gets one token.
pub fn plan(seqs: &[Progress], budget: usize, cost: Cost, cursor: usize) -> StepPlan {
    let n = seqs.len();
    let mut left = budget.max(1) as f64;
    let order: Vec<usize> = (0..n).map(|k| (cursor + k) % n.max(1)).collect();
    let mut rows = Vec::new();
    for &i in &order {
        let s = &seqs[i];
        if !s.in_prefill() && s.decoding && left > 0.0 {
            // A draft is checked in the same row: a distribution after every token fed.
            let logits = if s.draft > 0 { Logits::All } else { Logits::Last };
            rows.push(Row { seq: i, work: Work::Decode, logits });
            left -= cost.tokens(s.context, 1 + s.draft);
        }
    }
    // Prompts in line: the starved first, then the shortest remaining; ties in turn.
    let mut prompts: Vec<(usize, usize)> =
        order.iter().enumerate().filter(|(_, &i)| seqs[i].in_prefill()).map(|(turn, &i)| (turn, i)).collect();
    prompts.sort_by_key(|&(turn, i)| {
        let s = &seqs[i];
        (s.passed_over < STARVED_STEPS, s.prompt_len - s.prefilled, turn)
    });
    for (_, i) in prompts {
        let s = &seqs[i];
        let remaining = s.prompt_len - s.prefilled;
        let mut take = if left > 0.0 { cost.fit(s.context, remaining, left) } else { 0 };
        if take == 0 && rows.is_empty() {
            take = 1;
        }
        if take == 0 {
            continue;
        }
        let range = s.prefilled..s.prefilled + take;
        let logits = if s.prompt_logprobs {
            Logits::All
        } else if range.end == s.prompt_len {
            Logits::Last
        } else {
            Logits::None
        };
        left -= cost.tokens(s.context, take);
        rows.push(Row { seq: i, work: Work::Prefill(range), logits });
    }
    rows.sort_by_key(|r| r.seq);
    StepPlan { rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention free: every token costs 1, whatever its position.
    const FLAT: Cost = Cost { attention_span: f64::INFINITY };

    fn decoding() -> Progress {
        Progress { prompt_len: 4, prefilled: 4, decoding: true, context: 4, ..Default::default() }
    }

    fn prompt(len: usize, prefilled: usize) -> Progress {
        Progress { prompt_len: len, prefilled, context: prefilled, ..Default::default() }
    }

    #[test]
    fn decode_rows_come_first_and_prefill_fills_the_rest() {
        let seqs = [prompt(1000, 0), decoding(), decoding()];
        let p = plan(&seqs, 512, FLAT, 0);
        assert_eq!(
            p.rows,
            vec![
                Row { seq: 0, work: Work::Prefill(0..510), logits: Logits::None },
                Row { seq: 1, work: Work::Decode, logits: Logits::Last },
                Row { seq: 2, work: Work::Decode, logits: Logits::Last },
            ]
        );
        assert_eq!(p.tokens(), 512);
    }

    #[test]
    fn the_last_chunk_of_a_prompt_asks_for_logits_and_echo_asks_for_all() {
        let p = plan(&[prompt(600, 510)], 512, FLAT, 0);
        assert_eq!(p.rows[0], Row { seq: 0, work: Work::Prefill(510..600), logits: Logits::Last });
        let echo = Progress { prompt_logprobs: true, ..prompt(600, 0) };
        assert_eq!(plan(&[echo], 512, FLAT, 0).rows[0].logits, Logits::All);
    }

    #[test]
    fn a_short_prompt_never_waits_behind_a_long_one() {
        // Whoever's turn it is, the 8-token prompt runs whole in this step and the long
        // prompt takes the rest of the budget.
        for cursor in 0..2 {
            let p = plan(&[prompt(2000, 512), prompt(8, 0)], 512, FLAT, cursor);
            assert_eq!(
                p.rows,
                vec![
                    Row { seq: 0, work: Work::Prefill(512..1016), logits: Logits::None },
                    Row { seq: 1, work: Work::Prefill(0..8), logits: Logits::Last },
                ],
                "cursor {cursor}"
            );
        }
    }

    #[test]
    fn a_prompt_passed_over_long_enough_goes_first() {
        // Sixteen short prompts would fill the budget; a long prompt they kept out for
        // STARVED_STEPS steps gets its chunk before them.
        let mut seqs = vec![prompt(40, 0); 16];
        seqs.push(Progress { passed_over: STARVED_STEPS - 1, ..prompt(5000, 0) });
        assert!(plan(&seqs, 512, FLAT, 0).rows.iter().all(|r| r.seq != 16));
        seqs[16].passed_over = STARVED_STEPS;
        let p = plan(&seqs, 512, FLAT, 0);
        let long = p.rows.iter().find(|r| r.seq == 16).expect("the long prompt runs");
        assert_eq!(long.work, Work::Prefill(0..512));
    }

    #[test]
    fn a_chunk_shrinks_as_its_context_grows_so_steps_cost_the_same() {
        let cost = Cost { attention_span: 1500.0 };
        let mut chunks = Vec::new();
        for prefilled in [0, 2000, 4000, 8000] {
            let p = plan(&[prompt(16_000, prefilled)], 512, cost, 0);
            let Work::Prefill(range) = &p.rows[0].work else { panic!("a prefill chunk") };
            let n = range.len();
            // The largest chunk within the budget.
            assert!(cost.tokens(prefilled, n) <= 512.0);
            assert!(cost.tokens(prefilled, n + 1) > 512.0);
            chunks.push(n);
        }
        assert!(chunks[0] < 512, "at the start, attention already costs something: {chunks:?}");
        assert!(chunks.windows(2).all(|w| w[1] < w[0]), "{chunks:?}");
        assert!(chunks[3] < 100, "{chunks:?}");
    }

    #[test]
    fn decode_rows_at_a_long_context_cost_more() {
        let cost = Cost { attention_span: 1000.0 };
        let long = Progress { context: 3000, prefilled: 3000, prompt_len: 3000, decoding: true, ..Default::default() };
        // Each costs 4; a budget of 8 runs two of three.
        assert_eq!(plan(&[long, long, long], 8, cost, 0).rows.len(), 2);
    }

    #[test]
    fn a_step_always_makes_progress() {
        // Not even one token fits the budget: the prompt gets one anyway.
        let cost = Cost { attention_span: 10.0 };
        let p = plan(&[prompt(100, 90)], 1, cost, 0);
        assert_eq!(p.rows[0].work, Work::Prefill(90..91));
    }

    #[test]
    fn with_a_budget_smaller_than_the_batch_everyone_gets_a_turn() {
        let seqs = [decoding(), decoding(), decoding()];
        let mut served = [0; 3];
        for cursor in 0..6 {
            for r in plan(&seqs, 2, FLAT, cursor).rows {
                served[r.seq] += 1;
            }
        }
        assert_eq!(served, [4, 4, 4]);
    }

    #[test]
    fn a_draft_is_checked_in_its_decode_row_and_paid_for_in_the_budget() {
        let drafting = Progress { draft: 4, ..decoding() };
        let p = plan(&[drafting, prompt(100, 0)], 20, FLAT, 0);
        assert_eq!(p.rows[0], Row { seq: 0, work: Work::Decode, logits: Logits::All });
        // Five of the twenty went to the decode row and its draft.
        assert_eq!(p.rows[1].work, Work::Prefill(0..15));
    }

    #[test]
    fn nothing_to_do_is_an_empty_plan() {
        assert!(plan(&[], 512, FLAT, 3).is_empty());
        let waiting = Progress { decoding: false, ..decoding() };
        assert!(plan(&[waiting], 512, FLAT, 0).is_empty());
    }
}
