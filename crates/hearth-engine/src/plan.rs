//! What one engine step runs, decided without a model: which running sequences contribute a
//! decode row, which a prefill chunk and how long, and which logits each needs back. It is a
//! pure function of the sequences' progress, the step's token budget and whose turn it is, so
//! the scheduling rules are tested here alone.
//!
//! The rules: every decoding sequence gets its row first (decode rows are what users wait on
//! token by token), then prefill chunks fill what is left of the budget. Both go in turn from
//! `cursor`, which the scheduler moves every step, so when the budget is smaller than the
//! batch every sequence still gets its turn and no prompt waits behind another forever.

use std::ops::Range;

use crate::model::Logits;

/// Where one running sequence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub prompt_len: usize,
    /// Prompt tokens already in its KV cache.
    pub prefilled: usize,
    /// It has a sampled token to feed (it is decoding).
    pub decoding: bool,
    /// It wants a distribution after every prompt token (echo with logprobs).
    pub prompt_logprobs: bool,
}

impl Progress {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt_len
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Its pending token, one row.
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

/// Plans one step over `seqs` with at most `budget` tokens, turns starting at `cursor`.
pub fn plan(seqs: &[Progress], budget: usize, cursor: usize) -> StepPlan {
    let n = seqs.len();
    let mut budget = budget.max(1);
    let order: Vec<usize> = (0..n).map(|k| (cursor + k) % n.max(1)).collect();
    let mut rows = Vec::new();
    for &i in &order {
        let s = &seqs[i];
        if !s.in_prefill() && s.decoding && budget > 0 {
            rows.push(Row { seq: i, work: Work::Decode, logits: Logits::Last });
            budget -= 1;
        }
    }
    for &i in &order {
        let s = &seqs[i];
        if s.in_prefill() && budget > 0 {
            let take = (s.prompt_len - s.prefilled).min(budget);
            let range = s.prefilled..s.prefilled + take;
            let logits = if s.prompt_logprobs {
                Logits::All
            } else if range.end == s.prompt_len {
                Logits::Last
            } else {
                Logits::None
            };
            rows.push(Row { seq: i, work: Work::Prefill(range), logits });
            budget -= take;
        }
    }
    rows.sort_by_key(|r| r.seq);
    StepPlan { rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding() -> Progress {
        Progress { prompt_len: 4, prefilled: 4, decoding: true, prompt_logprobs: false }
    }

    fn prompt(len: usize, prefilled: usize) -> Progress {
        Progress { prompt_len: len, prefilled, decoding: false, prompt_logprobs: false }
    }

    #[test]
    fn decode_rows_come_first_and_prefill_fills_the_rest() {
        let seqs = [prompt(1000, 0), decoding(), decoding()];
        let p = plan(&seqs, 512, 0);
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
        let p = plan(&[prompt(600, 510)], 512, 0);
        assert_eq!(p.rows[0], Row { seq: 0, work: Work::Prefill(510..600), logits: Logits::Last });
        let echo = Progress { prompt_logprobs: true, ..prompt(600, 0) };
        assert_eq!(plan(&[echo], 512, 0).rows[0].logits, Logits::All);
    }

    #[test]
    fn a_long_prompt_shares_the_budget_in_turns() {
        // Two prompts, a budget for one: each step the one whose turn it is goes first.
        let seqs = [prompt(2000, 0), prompt(8, 0)];
        let first = plan(&seqs, 512, 0);
        assert_eq!(first.rows, vec![Row { seq: 0, work: Work::Prefill(0..512), logits: Logits::None }]);
        let second = plan(&[prompt(2000, 512), prompt(8, 0)], 512, 1);
        assert_eq!(
            second.rows,
            vec![
                Row { seq: 0, work: Work::Prefill(512..1016), logits: Logits::None },
                Row { seq: 1, work: Work::Prefill(0..8), logits: Logits::Last },
            ]
        );
    }

    #[test]
    fn with_a_budget_smaller_than_the_batch_everyone_gets_a_turn() {
        let seqs = [decoding(), decoding(), decoding()];
        let mut served = [0; 3];
        for cursor in 0..6 {
            for r in plan(&seqs, 2, cursor).rows {
                served[r.seq] += 1;
            }
        }
        assert_eq!(served, [4, 4, 4]);
    }

    #[test]
    fn nothing_to_do_is_an_empty_plan() {
        assert!(plan(&[], 512, 3).is_empty());
        let waiting = Progress { decoding: false, ..decoding() };
        assert!(plan(&[waiting], 512, 0).is_empty());
    }
}
