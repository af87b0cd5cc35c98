//! A string's `pattern` (an ECMA-262 regular expression, as JSON Schema defines it), with
//! `minLength`/`maxLength` beside it: a DFA over the string's decoded UTF-8 bytes, and the
//! (state, length) pairs from which a match can still be finished, so the matcher never
//! lets a string start down a path that cannot end in a match.

use std::collections::{HashMap, VecDeque};

use regex_automata::dfa::{dense, Automaton as _};
use regex_automata::util::primitives::StateID;
use regex_automata::{Anchored, Input, MatchKind};

use super::TextStep;

/// DFA states a pattern may compile to, and (state, length) pairs it may track beside
/// `minLength`/`maxLength`: bounds on what a request's schema may cost.
const MAX_STATES: usize = 16_384;
const MAX_PAIRS: usize = 1 << 22;
/// Lookaheads one pattern may start with (each is an automaton run beside the pattern's).
const MAX_LOOKAHEADS: usize = 8;
/// The DFA's own size limits while it is built (bytes).
const BUILD_LIMIT: usize = 8 << 20;

/// The state no match can come from.
const DEAD: u32 = 0;

/// The escapes a pattern string may use (`\uXXXX` is not among them: every character it
/// could write is written as itself, or as one of these), and the byte each stands for.
pub(super) const ESCAPES: [(u8, u8); 8] = [
    (b'"', b'"'),
    (b'\\', b'\\'),
    (b'/', b'/'),
    (b'b', 0x08),
    (b'f', 0x0C),
    (b'n', b'\n'),
    (b'r', b'\r'),
    (b't', b'\t'),
];

/// Whether a string's text may hold byte `b`: raw, or through one of [`ESCAPES`].
fn writable(b: u8) -> bool {
    b >= 0x20 || ESCAPES.iter().any(|&(_, byte)| byte == b)
}

fn continuation(b: u8) -> bool {
    (0x80..=0xBF).contains(&b)
}

/// A compiled `pattern`, held to a length in characters.
#[derive(Debug, Clone)]
pub(super) struct Automaton {
    /// Bytes by class: bytes of one class lead every state to the same next state.
    classes: [u8; 256],
    class_count: usize,
    /// `next[state * class_count + class]`; state 0 is [`DEAD`].
    next: Vec<u32>,
    /// States in which the text so far, ending here, matches.
    accepting: Vec<bool>,
    start: u32,
    min: u32,
    /// `u32::MAX`: no maximum.
    max: u32,
    /// Lengths tracked per state: up to `max`, or up to `min` (longer ones are alike).
    cap: u32,
    /// Bit `state * (cap + 1) + length`: a match can still be finished from there.
    live: Vec<u64>,
}

impl PatternText {
    /// Between characters: not inside an escape or a multi-byte character.
    pub(super) fn between_chars(&self) -> bool {
        !self.escape && self.pending == 0
    }
}

/// Where a pattern string stands (after its opening quote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PatternText {
    state: u32,
    chars: u32,
    /// After a `\`.
    escape: bool,
    /// UTF-8 continuation bytes still expected, and the next one's range.
    pending: u8,
    low: u8,
    high: u8,
}

/// Rewrites an ECMA-262 pattern into the regex crate's syntax with the same meaning, or
/// narrower where the two differ (`\d`, `\w`, `\s` and `.` as ECMA-262 defines them, so
/// every string generated also matches in JavaScript, Python and Rust validators).
pub(super) fn ecma_to_rust(pattern: &str) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(e) = chars.next() else {
                    return Err("it ends in a lone `\\`".into());
                };
                match (e, in_class) {
                    ('d', false) => out.push_str("[0-9]"),
                    ('d', true) => out.push_str("0-9"),
                    ('w', false) => out.push_str("[0-9A-Za-z_]"),
                    ('w', true) => out.push_str("0-9A-Za-z_"),
                    ('s', false) => out.push_str(r"[\t\n\x0B\x0C\r ]"),
                    ('s', true) => out.push_str(r"\t\n\x0B\x0C\r "),
                    // Not a digit, a word character or whitespace in ECMA-262's ASCII
                    // sense nor in Unicode's.
                    ('D', _) => out.push_str(r"\D"),
                    ('W', _) => out.push_str(r"\W"),
                    ('S', _) => out.push_str(r"[^\s\x{FEFF}]"),
                    // Unicode's boundaries, which the DFA follows only over ASCII text
                    // (see the quit below): there ECMA-262's and Unicode's agree.
                    ('b', false) => out.push_str(r"\b"),
                    ('B', false) => out.push_str(r"\B"),
                    ('b', true) => out.push_str(r"\x08"),
                    ('0', _) if !chars.peek().is_some_and(char::is_ascii_digit) => {
                        out.push_str(r"\x00")
                    }
                    ('1'..='9', _) | ('k', _) => {
                        return Err(format!(
                            "`\\{e}` is a backreference, which no regular automaton can follow"
                        ));
                    }
                    ('u', _) if chars.peek() == Some(&'{') => out.push_str(r"\x"),
                    ('u', _) => {
                        let hex: String = (0..4).filter_map(|_| chars.next()).collect();
                        if hex.len() != 4 || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
                            return Err(format!(
                                "`\\u{hex}` is not a `\\u` escape of four hex digits"
                            ));
                        }
                        out.push_str(&format!(r"\x{{{hex}}}"));
                    }
                    ('n' | 't' | 'r' | 'f' | 'v' | 'x' | 'p' | 'P', _) => {
                        out.push('\\');
                        out.push(e);
                    }
                    (e, _) if e.is_ascii_alphanumeric() => {
                        return Err(format!("the escape `\\{e}` is not supported"));
                    }
                    // Any other escaped character stands for itself.
                    (e, _) => out.push_str(&format!(r"\x{{{:X}}}", e as u32)),
                }
            }
            '[' if !in_class => {
                in_class = true;
                let negated = chars.peek() == Some(&'^');
                if negated {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    // ECMA-262's `[]` matches nothing and `[^]` any character.
                    chars.next();
                    in_class = false;
                    if !negated {
                        return Err("`[]` matches no character".into());
                    }
                    out.push_str("(?s:.)");
                    continue;
                }
                out.push_str(if negated { "[^" } else { "[" });
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            // In a class these are literal in ECMA-262, set operators or nesting in Rust.
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            '.' if !in_class => out.push_str(r"[^\n\r\x{2028}\x{2029}]"),
            '(' if !in_class && chars.peek() == Some(&'?') => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with("?=")
                    || rest.starts_with("?!")
                    || rest.starts_with("?<=")
                    || rest.starts_with("?<!")
                {
                    return Err("lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`) is not supported".into());
                }
                out.push('(');
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A DFA of `pattern` (regex crate syntax), anchored at the start, reporting every match.
fn build_dfa(pattern: &str) -> Result<dense::DFA<Vec<u32>>, String> {
    dense::Builder::new()
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(regex_automata::dfa::StartKind::Anchored)
                .accelerate(false)
                .unicode_word_boundary(true)
                .dfa_size_limit(Some(BUILD_LIMIT))
                .determinize_size_limit(Some(BUILD_LIMIT)),
        )
        // Bounded before the DFA too: `((a{100}){100}){100}` is small text but a huge NFA.
        .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(BUILD_LIMIT)))
        .build(pattern)
        .map_err(|e| {
            // The builder's own message is generic; its sources say what failed.
            let mut e: &dyn std::error::Error = &e;
            while let Some(source) = e.source() {
                e = source;
            }
            let e = e.to_string();
            if e.contains("exceeded") || e.contains("limit") {
                "it is too complex to follow (its automaton is too large)".to_string()
            } else {
                format!("it is not a regular expression runner can follow: {e}")
            }
        })
}

/// Lookaheads at the very start of an anchored pattern (`^(?=.*\d)(?!0)…`, as password
/// rules and older Pydantic's `Decimal` write them): each `(positive, body)`, and the pattern
/// without them. Anywhere else a lookahead is refused (by [`ecma_to_rust`]).
fn leading_lookaheads(pattern: &str) -> Result<(Vec<(bool, String)>, String), String> {
    let Some(mut rest) = pattern.strip_prefix('^') else {
        return Ok((Vec::new(), pattern.to_string()));
    };
    let mut found = Vec::new();
    while let Some(positive) = match rest.get(..3) {
        Some("(?=") => Some(true),
        Some("(?!") => Some(false),
        _ => None,
    } {
        // The group's end: its closing parenthesis, past escapes and classes.
        let (mut depth, mut in_class, mut escaped, mut end) = (0usize, false, false, None);
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '[' if !in_class => in_class = true,
                ']' if in_class => in_class = false,
                '(' if !in_class => depth += 1,
                ')' if !in_class => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let end = end.ok_or("a lookahead is not closed")?;
        if found.len() == MAX_LOOKAHEADS {
            return Err(format!(
                "it starts with more than {MAX_LOOKAHEADS} lookaheads"
            ));
        }
        found.push((positive, rest[3..end].to_string()));
        rest = &rest[end + 1..];
    }
    Ok((found, format!("^{rest}")))
}

impl Automaton {
    /// Compiles `pattern` for strings of `min..=max` characters (`max` `u32::MAX`: none).
    pub(super) fn compile(pattern: &str, min: u32, max: u32) -> Result<Self, String> {
        let (lookaheads, rest) = leading_lookaheads(pattern)?;
        // JSON Schema's patterns are not anchored: the text matches if any part of it does.
        let main = build_dfa(&format!("(?s:.)*(?:{})(?s:.)*", ecma_to_rust(&rest)?))?;
        // A lookahead at the start holds if some prefix of the text matches it.
        let checks = lookaheads
            .iter()
            .map(|(positive, body)| Ok((*positive, build_dfa(&ecma_to_rust(body)?)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let start_of = |dfa: &dense::DFA<Vec<u32>>| {
            dfa.start_state_forward(&Input::new("").anchored(Anchored::Yes))
                .map_err(|e| format!("it has no start: {e}"))
        };

        // Byte classes: the DFAs', split where a string's view of the byte differs.
        let mut classes = [0u8; 256];
        let mut representatives: Vec<u8> = Vec::new();
        let mut by_signature: HashMap<Vec<u8>, u8> = HashMap::new();
        for b in 0..=255u8 {
            let mut signature = vec![
                main.byte_classes().get(b),
                u8::from(writable(b)),
                u8::from(continuation(b)),
            ];
            signature.extend(checks.iter().map(|(_, dfa)| dfa.byte_classes().get(b)));
            classes[b as usize] = *by_signature.entry(signature).or_insert_with(|| {
                representatives.push(b);
                (representatives.len() - 1) as u8
            });
        }
        let class_count = representatives.len();

        // The product of the pattern's DFA and its lookaheads': each lookahead's DFA state,
        // or whether some prefix already matched it.
        #[derive(Clone, PartialEq, Eq, Hash)]
        enum Check {
            Running(StateID),
            Matched,
            Never,
        }
        let mut start = vec![Check::Running(start_of(&main)?)];
        for (_, dfa) in &checks {
            start.push(Check::Running(start_of(dfa)?));
        }
        let mut ids: HashMap<Vec<Check>, u32> = HashMap::from([(start.clone(), 1)]);
        let mut states = vec![start];
        let mut next = vec![DEAD; class_count]; // the dead state's row
        let mut accepting = vec![false];
        let mut index = 0;
        while index < states.len() {
            let state = states[index].clone();
            index += 1;
            let Check::Running(main_state) = state[0] else {
                unreachable!("the pattern's own DFA is always running here")
            };
            // Whether the whole text, ending here, matches: the pattern, and each lookahead
            // as it asks (matched by some prefix, or by none).
            let ends_matched = |check: &Check, dfa: &dense::DFA<Vec<u32>>| match check {
                Check::Matched => true,
                Check::Never => false,
                Check::Running(s) => dfa.is_match_state(dfa.next_eoi_state(*s)),
            };
            accepting.push(
                main.is_match_state(main.next_eoi_state(main_state))
                    && checks
                        .iter()
                        .zip(&state[1..])
                        .all(|((positive, dfa), check)| ends_matched(check, dfa) == *positive),
            );
            for &b in &representatives {
                let target = main.next_state(main_state, b);
                // A quit: a non-ASCII byte where a word boundary matters, which
                // validators decide differently. Refused: such patterns write ASCII.
                let mut dead =
                    !writable(b) || main.is_dead_state(target) || main.is_quit_state(target);
                let mut product = vec![Check::Running(target)];
                for ((positive, dfa), check) in checks.iter().zip(&state[1..]) {
                    let after = match check {
                        Check::Running(s) => {
                            let t = dfa.next_state(*s, b);
                            // A match state: a prefix before this byte matched.
                            if dfa.is_match_state(t) {
                                Check::Matched
                            } else if dfa.is_dead_state(t) || dfa.is_quit_state(t) {
                                Check::Never
                            } else {
                                Check::Running(t)
                            }
                        }
                        done => done.clone(),
                    };
                    // A negative lookahead something matched: no text from here can match.
                    dead |= !positive && after == Check::Matched;
                    product.push(after);
                }
                let id = if dead {
                    DEAD
                } else if let Some(&id) = ids.get(&product) {
                    id
                } else {
                    if states.len() >= MAX_STATES {
                        return Err(format!(
                            "it is too complex to follow (more than {MAX_STATES} automaton states)"
                        ));
                    }
                    states.push(product.clone());
                    ids.insert(product, states.len() as u32);
                    states.len() as u32
                };
                next.push(id);
            }
        }
        let state_count = states.len() + 1;
        let cap = if max == u32::MAX { min } else { max };
        if state_count.saturating_mul(cap as usize + 1) > MAX_PAIRS {
            return Err(format!(
                "with minLength/maxLength {min}..{} it is too large to follow; bound the length in the pattern instead",
                if max == u32::MAX { "".to_string() } else { max.to_string() }
            ));
        }
        let mut automaton = Automaton {
            classes,
            class_count,
            next,
            accepting,
            start: 1,
            min,
            max,
            cap,
            live: vec![0; (state_count * (cap as usize + 1)).div_ceil(64)],
        };
        automaton.find_live(&representatives);
        if !automaton.is_live(automaton.start, 0) {
            return Err(if min > 0 || max != u32::MAX {
                "no string of the lengths minLength/maxLength allow matches it".to_string()
            } else {
                "no string a JSON document can hold matches it".to_string()
            });
        }
        Ok(automaton)
    }

    fn bit(&self, state: u32, chars: u32) -> Option<usize> {
        let chars = if self.max == u32::MAX {
            chars.min(self.cap)
        } else if chars > self.max {
            return None;
        } else {
            chars
        };
        Some(state as usize * (self.cap as usize + 1) + chars as usize)
    }

    /// Marks, backwards from the accepting pairs, every (state, length) a match can still
    /// be finished from.
    fn find_live(&mut self, representatives: &[u8]) {
        let states = self.accepting.len();
        let mut predecessors: Vec<Vec<(u32, u8)>> = vec![Vec::new(); states];
        for from in 1..states {
            for class in 0..self.class_count {
                let to = self.next[from * self.class_count + class];
                if to != DEAD {
                    predecessors[to as usize].push((from as u32, class as u8));
                }
            }
        }
        let mut queue = VecDeque::new();
        let mark = |automaton: &mut Self, queue: &mut VecDeque<(u32, u32)>, s: u32, c: u32| {
            if let Some(bit) = automaton.bit(s, c) {
                if automaton.live[bit / 64] & (1 << (bit % 64)) == 0 {
                    automaton.live[bit / 64] |= 1 << (bit % 64);
                    queue.push_back((s, c));
                }
            }
        };
        for s in 1..states as u32 {
            if self.accepting[s as usize] {
                for c in self.min..=self.cap {
                    mark(self, &mut queue, s, c);
                }
            }
        }
        let bounded = self.max != u32::MAX;
        while let Some((to, chars)) = queue.pop_front() {
            for &(from, class) in &predecessors[to as usize] {
                if continuation(representatives[class as usize]) {
                    mark(self, &mut queue, from, chars);
                    continue;
                }
                if chars >= 1 {
                    mark(self, &mut queue, from, chars - 1);
                }
                if !bounded && chars == self.cap {
                    mark(self, &mut queue, from, self.cap); // longer lengths are alike
                }
            }
        }
    }

    fn is_live(&self, state: u32, chars: u32) -> bool {
        state != DEAD
            && self
                .bit(state, chars)
                .is_some_and(|bit| self.live[bit / 64] & (1 << (bit % 64)) != 0)
    }

    fn step(&self, state: u32, b: u8) -> u32 {
        self.next[state as usize * self.class_count + self.classes[b as usize] as usize]
    }

    /// A pattern string's text at its start (after the opening quote).
    pub(super) fn text(&self) -> PatternText {
        PatternText {
            state: self.start,
            chars: 0,
            escape: false,
            pending: 0,
            low: 0x80,
            high: 0xBF,
        }
    }

    /// One byte of the string's JSON text, after its opening quote. Bytes are taken only
    /// where the match can still be finished, in valid UTF-8 and valid escapes.
    pub(super) fn text_step(&self, text: &mut PatternText, b: u8) -> TextStep {
        let take = |text: &mut PatternText, byte: u8, chars: u32| {
            let state = self.step(text.state, byte);
            if !self.is_live(state, chars) {
                return false;
            }
            text.state = state;
            text.chars = chars;
            true
        };
        if text.pending > 0 {
            if !(text.low..=text.high).contains(&b) || !take(text, b, text.chars) {
                return TextStep::Refused;
            }
            text.pending -= 1;
            (text.low, text.high) = (0x80, 0xBF);
            return TextStep::Took;
        }
        if text.escape {
            let Some(&(_, byte)) = ESCAPES.iter().find(|&&(e, _)| e == b) else {
                return TextStep::Refused;
            };
            if !take(text, byte, text.chars) {
                return TextStep::Refused;
            }
            text.escape = false;
            return TextStep::Took;
        }
        if b == b'"' {
            let done = self.accepting[text.state as usize]
                && text.chars >= self.min
                && text.chars <= self.max;
            return if done {
                TextStep::Closed
            } else {
                TextStep::Refused
            };
        }
        let chars = text.chars + 1;
        if b == b'\\' {
            // Only where some escape could follow.
            let escapable = ESCAPES
                .iter()
                .any(|&(_, byte)| self.is_live(self.step(text.state, byte), chars));
            if !escapable {
                return TextStep::Refused;
            }
            text.escape = true;
            text.chars = chars;
            return TextStep::Took;
        }
        let Some((pending, low, high)) = super::utf8_lead(b) else {
            return TextStep::Refused;
        };
        if !take(text, b, chars) {
            return TextStep::Refused;
        }
        (text.pending, text.low, text.high) = (pending, low, high);
        TextStep::Took
    }
}
