//! Turning a next-token distribution into a token: penalties, temperature, top-k, top-p, and
//! a seeded generator so the same seed gives the same output.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Multiplicative, as in Hugging Face's `repetition_penalty`; 1 is none.
    pub repetition_penalty: f32,
    /// How many alternatives to report per token (`top_logprobs`); `None` reports no logprobs.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
        }
    }
}

pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad(format!("temperature must be between 0 and 2, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return bad(format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"));
        }
        Ok(())
    }
}

/// A token chosen, with the model's log-probability of it and of the best alternatives
/// (from the unmodified distribution, as OpenAI reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Computed only for requests that ask for logprobs: it takes a softmax over the whole
    /// vocabulary, which greedy decoding otherwise never needs.
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    rng: StdRng,
}

/// log-softmax of raw logits, in f64 for the sum so long vocabularies do not lose precision.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// The `k` best (token, logprob) pairs, best first, ties to the lower id.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k.saturating_sub(1), cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

impl Sampler {
    pub fn new(seed: Option<u64>) -> Sampler {
        Sampler {
            rng: match seed {
                Some(s) => StdRng::seed_from_u64(s),
                None => StdRng::from_entropy(),
            },
        }
    }

    /// Picks the next token. `prompt` and `generated` feed the penalties: the repetition
    /// penalty covers both (as Hugging Face's does), presence and frequency only what was
    /// generated (as OpenAI's do).
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32], p: &SamplingParams) -> Sampled {
        let penalized = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let mut l = std::borrow::Cow::Borrowed(logits);
        if penalized {
            self.penalize(l.to_mut(), prompt, generated, p);
        }
        let token = if p.temperature == 0.0 { argmax(&l) } else { self.draw(&l, p) };
        let (logprob, top) = match p.logprobs {
            Some(k) => {
                let raw = log_softmax(logits);
                (raw.get(token as usize).copied().or(Some(f32::NEG_INFINITY)), top_k(&raw, k))
            }
            None => (None, Vec::new()),
        };
        Sampled { token, logprob, top }
    }

    /// Applies the repetition, presence and frequency penalties to `l`.
    fn penalize(&self, l: &mut [f32], prompt: &[u32], generated: &[u32], p: &SamplingParams) {
        if p.repetition_penalty != 1.0 {
            for &t in prompt.iter().chain(generated) {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        let scaled: Vec<f32> = logits.iter().map(|x| x / p.temperature).collect();
        let lp = log_softmax(&scaled);
        // Candidates best first; top-k then top-p cut the tail.
        let k = if p.top_k == 0 { lp.len() } else { p.top_k.min(lp.len()) };
        let mut cands = top_k(&lp, k);
        if p.top_p < 1.0 {
            let mut mass = 0.0f64;
            let mut keep = 0;
            for (_, l) in &cands {
                mass += (*l as f64).exp();
                keep += 1;
                if mass >= p.top_p as f64 {
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        let total: f64 = cands.iter().map(|(_, l)| (*l as f64).exp()).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for (t, l) in &cands {
            r -= (*l as f64).exp();
            if r <= 0.0 {
                return *t;
            }
        }
        cands.last().map(|(t, _)| *t).unwrap_or(0)
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in l.iter().enumerate() {
        if *x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_reports_raw_logprobs() {
        let mut s = Sampler::new(Some(1));
        let p = SamplingParams { temperature: 0.0, logprobs: Some(2), ..Default::default() };
        let out = s.sample(&[0.0, 2.0, 1.0], &[], &[], &p);
        assert_eq!(out.token, 1);
        let lp = log_softmax(&[0.0, 2.0, 1.0]);
        assert_eq!(out.logprob, Some(lp[1]));
        assert_eq!(out.top, vec![(1, lp[1]), (2, lp[2])]);
        // Without logprobs asked for, none are computed.
        let plain = s.sample(&[0.0, 2.0, 1.0], &[], &[], &SamplingParams { temperature: 0.0, ..Default::default() });
        assert_eq!((plain.token, plain.logprob, plain.top), (1, None, vec![]));
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, seed: Some(42), ..Default::default() };
        let draw = |seed| {
            let mut s = Sampler::new(Some(seed));
            (0..20).map(|_| s.sample(&logits, &[], &[], &p).token).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 0.5, 3.0, 0.2];
        let mut s = Sampler::new(Some(7));
        for p in
            [SamplingParams { top_k: 1, ..Default::default() }, SamplingParams { top_p: 0.01, ..Default::default() }]
        {
            for _ in 0..10 {
                assert_eq!(s.sample(&logits, &[], &[], &p).token, 2);
            }
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [1.0, 1.1];
        let mut s = Sampler::new(Some(0));
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(s.sample(&logits, &[], &[1], &greedy).token, 1);
        let pen = SamplingParams { presence_penalty: 0.5, ..greedy.clone() };
        assert_eq!(s.sample(&logits, &[], &[1], &pen).token, 0);
        let rep = SamplingParams { repetition_penalty: 1.2, ..greedy };
        assert_eq!(s.sample(&logits, &[1], &[], &rep).token, 0);
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let e = SamplingParams { temperature: 3.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("temperature"));
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }
}
