//! The prefix cache: full KV blocks of earlier prompts (and of what was generated after them),
//! kept so that a request whose prompt begins with the same tokens (a shared system prompt,
//! the earlier turns of a conversation) starts from them instead of computing them again.
//!
//! A block is found by its chain key: a hash of the key of the block before it and its own
//! `PAGE` tokens, from a root that names everything else the keys and values depend on: the
//! adapter's content hash (its version, never its name, so a reloaded adapter never meets its
//! old cache and two adapters never share one) and the request's isolation key
//! (`prompt_cache_isolation_key`, so tenants never share). Each entry keeps its tokens and
//! parent key, compared on lookup, so a hash collision is a miss, never a wrong block.
//!
//! Blocks are shared, not copied: a sequence that starts from cached blocks holds the same
//! `Arc`s (see `model::kv`). An entry that no running sequence holds is idle, and idle entries
//! are evicted least recently used first when the engine needs their memory. Only host caches
//! take part; a GPU's cache is not paged.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::kernels::attention::PAGE;
use crate::model::{KvCache, SharedBlock};

/// Counters the engine reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    /// Requests that started from at least one cached block.
    pub hits: u64,
    /// Requests that looked and found none.
    pub misses: u64,
    /// Prompt tokens not computed because their blocks were cached.
    pub cached_tokens: u64,
    /// Blocks dropped to make room.
    pub evictions: u64,
}

struct Entry {
    parent: u64,
    /// Its index in the chain: of two entries used last at once, the deeper goes first, so
    /// eviction shortens chains from their ends.
    depth: usize,
    tokens: Box<[u32]>,
    block: SharedBlock,
    last_used: u64,
}

pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Bytes of one block (every layer's keys and values for `PAGE` tokens).
    block_bytes: usize,
    clock: u64,
    pub stats: PrefixStats,
}

/// Where a request's chain of blocks starts.
pub fn root(adapter_version: Option<&str>, isolation: Option<&str>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    ("hearth-prefix", adapter_version, isolation).hash(&mut h);
    h.finish()
}

fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (parent, tokens).hash(&mut h);
    h.finish()
}

impl PrefixCache {
    pub fn new(block_bytes: usize) -> PrefixCache {
        PrefixCache { entries: HashMap::new(), block_bytes, clock: 0, stats: PrefixStats::default() }
    }

    /// Bytes the cached blocks take (those running sequences also hold included).
    pub fn bytes(&self) -> usize {
        self.entries.len() * self.block_bytes
    }

    pub fn blocks(&self) -> usize {
        self.entries.len()
    }

    /// Counts a request admitted with `cached` prompt tokens from the cache.
    pub fn record(&mut self, cached: usize) {
        if cached == 0 {
            self.stats.misses += 1;
        } else {
            self.stats.hits += 1;
            self.stats.cached_tokens += cached as u64;
        }
    }

    /// The cached blocks that begin `prompt`, at most `max_blocks` of them, marked used.
    pub fn lookup(&mut self, root: u64, prompt: &[u32], max_blocks: usize) -> Vec<SharedBlock> {
        self.clock += 1;
        let mut found = Vec::new();
        let mut key = root;
        for tokens in prompt.chunks_exact(PAGE).take(max_blocks) {
            let next = chain(key, tokens);
            match self.entries.get_mut(&next) {
                Some(e) if e.parent == key && *e.tokens == *tokens => {
                    e.last_used = self.clock;
                    found.push(e.block.clone());
                    key = next;
                }
                _ => break,
            }
        }
        found
    }

    /// Offers the full blocks of `cache`, which holds `tokens` (its first `cache.len()`), from
    /// block `from` on; returns how many of its blocks are now cached (or were already). A
    /// block is taken only while `room(bytes)` says the engine can spare its memory, after
    /// idle entries were evicted to make it.
    pub fn insert(
        &mut self,
        root: u64,
        tokens: &[u32],
        cache: &KvCache,
        from: usize,
        room: impl Fn(usize) -> bool,
    ) -> usize {
        self.clock += 1;
        let full = tokens.len().min(cache.len()) / PAGE;
        let mut key = root;
        for i in 0..full {
            let t = &tokens[i * PAGE..(i + 1) * PAGE];
            let next = chain(key, t);
            if i >= from {
                match self.entries.get_mut(&next) {
                    Some(e) if e.parent == key && *e.tokens == *t => e.last_used = self.clock,
                    // A collision with another chain keeps the first; this one ends here.
                    Some(_) => return i,
                    None => {
                        let Some(block) = cache.full_block(i) else { return i };
                        if !room(self.bytes() + self.block_bytes) && !self.evict_for(self.block_bytes, &room) {
                            return i;
                        }
                        self.entries.insert(
                            next,
                            Entry { parent: key, depth: i, tokens: t.into(), block, last_used: self.clock },
                        );
                    }
                }
            }
            key = next;
        }
        full
    }

    /// Evicts idle entries, least recently used first, until `room` accepts `extra` more
    /// bytes beside the cache; returns whether it does.
    pub fn evict_for(&mut self, extra: usize, room: impl Fn(usize) -> bool) -> bool {
        if room(self.bytes() + extra) {
            return true;
        }
        let mut idle: Vec<(u64, std::cmp::Reverse<usize>, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.block.in_use())
            .map(|(k, e)| (e.last_used, std::cmp::Reverse(e.depth), *k))
            .collect();
        idle.sort_unstable();
        for (_, _, k) in idle {
            self.entries.remove(&k);
            self.stats.evictions += 1;
            if room(self.bytes() + extra) {
                return true;
            }
        }
        false
    }

    /// Drops every entry (the weights changed: a merge or an unmerge).
    pub fn clear(&mut self) {
        self.stats.evictions += self.entries.len() as u64;
        self.entries.clear();
    }
}
