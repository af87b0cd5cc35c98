//! Reuse of recent generations' KV caches: a prompt that starts the way an earlier
//! prompt-plus-output did (a chat's history, resent every turn; a long shared system prompt)
//! continues from that session, and only its new tokens are processed.
//!
//! A cached position's keys and values are the ones a full pass over the prompt would
//! compute (each row's arithmetic does not depend on the rows beside it), so a reused
//! prefix gives the same logits, bit for bit, as processing the whole prompt again.
//! A session a prompt continues is taken out while in use and put back, longer, when its
//! prediction succeeds; one a prompt leaves part way is copied up to there. The oldest go
//! when the cache passes its size (`RUNNER_LLAMA_PROMPT_CACHE_MB`,
//! default 256; 0 turns reuse off).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::native;

/// Shorter shared prefixes are not worth a lookup.
const MIN_REUSE: usize = 8;
/// Sessions kept at most.
const MAX_ENTRIES: usize = 8;
/// The cache's size unless `RUNNER_LLAMA_PROMPT_CACHE_MB` says otherwise.
const DEFAULT_MB: usize = 256;

struct Entry {
    /// The tokens whose keys and values the session holds, in order.
    tokens: Vec<u32>,
    session: native::Model,
}

pub struct PromptCache {
    entries: Mutex<VecDeque<Entry>>,
    budget_bytes: usize,
}

impl Default for PromptCache {
    fn default() -> Self {
        let megabytes = match std::env::var("RUNNER_LLAMA_PROMPT_CACHE_MB") {
            Err(_) => DEFAULT_MB,
            Ok(v) => v.trim().parse::<usize>().unwrap_or_else(|_| {
                tracing::warn!(
                    "RUNNER_LLAMA_PROMPT_CACHE_MB={v:?} is not a number of megabytes (0 turns the prompt cache off); using {DEFAULT_MB}"
                );
                DEFAULT_MB
            }),
        };
        Self {
            entries: Mutex::default(),
            budget_bytes: megabytes << 20,
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PromptCache {
    pub fn enabled(&self) -> bool {
        self.budget_bytes > 0
    }

    /// A session holding the longest prefix `prompt` shares with a cached one (at least
    /// [`MIN_REUSE`] tokens), and how many of the prompt's tokens it holds (never all: the
    /// last one is fed to get the next token's logits). A prompt that continues a cached
    /// session takes it out (a chat's next turn); one that leaves it part way gets a copy
    /// of the shared part and leaves it for others (a system prompt many requests share).
    pub fn take(&self, prompt: &[u32]) -> Option<(native::Model, usize)> {
        if !self.enabled() {
            return None;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (index, shared) = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(_, shared)| shared)?;
        let reuse = shared.min(prompt.len().saturating_sub(1));
        if reuse < MIN_REUSE {
            return None;
        }
        if shared >= entries[index].tokens.len() {
            let entry = entries.remove(index)?;
            return Some((entry.session, reuse));
        }
        Some((entries[index].session.prefix(reuse), reuse))
    }

    /// Keeps `session`, which holds `tokens`, for later prompts; the oldest sessions go
    /// when the cache is over its size.
    pub fn put(&self, tokens: Vec<u32>, session: native::Model) {
        if !self.enabled() || tokens.len() < MIN_REUSE {
            return;
        }
        let bytes = |e: &Entry| e.tokens.len() * e.session.kv_bytes_per_position();
        let entry = Entry { tokens, session };
        if bytes(&entry) > self.budget_bytes {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // A session that another one extends is of no more use.
        entries.retain(|e| common_prefix(&e.tokens, &entry.tokens) < e.tokens.len());
        entries.push_back(entry);
        while entries.len() > MAX_ENTRIES
            || entries.iter().map(bytes).sum::<usize>() > self.budget_bytes
        {
            entries.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_shared_prefix_is_found_and_never_the_whole_prompt() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}
