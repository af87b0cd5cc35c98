//! Numbers held to `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` and
//! `multipleOf`.
//!
//! A bounded number is written plainly (`-12.5`, no exponent) with at most
//! [`MAX_DIGITS`] digits before and after the point, so every value it can take is a
//! whole number of 10^-15 units: the bounds, the step and each prefix are compared
//! exactly, in `i128`. A digit is taken only if some number that starts with the text so
//! far lies within the bounds and is a multiple of the step.
//!
//! `multipleOf` has its exact decimal meaning (0.07 is a multiple of 0.01), as Pydantic
//! checks it; validators that divide binary floating-point numbers can disagree on such
//! values, never on multiples of whole numbers or of halves, quarters and so on.

use serde_json::{Map, Number, Value};

use super::{fail, SchemaError, MAX_DIGITS};

/// 10^-15 units in one.
const SCALE: i128 = 1_000_000_000_000_000;

fn pow10(k: u8) -> i128 {
    10i128.pow(u32::from(k))
}

/// Inclusive bounds, in units, and the step every value is a multiple of: one unit for
/// numbers, [`SCALE`] for integers, or `multipleOf` (for integers, a multiple of both).
/// The bounds are multiples of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Range {
    lo: i128,
    hi: i128,
    step: i128,
    integer: bool,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `n` in units, rounded down, and whether that is exact. Far-off values are clamped
/// beyond anything a bounded number can be.
fn units(n: &Number) -> (i128, bool) {
    const FAR: i128 = SCALE * SCALE * 1000;
    if let Some(i) = n.as_i64() {
        return (i128::from(i) * SCALE, true);
    }
    if let Some(u) = n.as_u64() {
        return (i128::from(u) * SCALE, true);
    }
    let f = n.as_f64().unwrap_or(0.0);
    // The shortest decimal that reads back as `f`: what the schema's author wrote.
    let text = format!("{:e}", f.abs());
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let shift = exponent - (digits.len() as i32 - 1) + 15;
    let m: i128 = digits.parse().unwrap_or(0);
    let sign = if f < 0.0 { -1 } else { 1 };
    if shift >= 0 {
        let value = if shift > 20 {
            FAR
        } else {
            (m * 10i128.pow(shift as u32)).min(FAR)
        };
        return (sign * value, true);
    }
    let divisor = if -shift > 30 {
        None
    } else {
        Some(10i128.pow((-shift) as u32))
    };
    let (quotient, exact) = match divisor {
        Some(d) => (m / d, m % d == 0),
        None => (0, m == 0),
    };
    if sign < 0 {
        // Down, for a negative value, is away from zero.
        (-quotient - i128::from(!exact), exact)
    } else {
        (quotient, exact)
    }
}

fn number(
    schema: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<Number>, SchemaError> {
    match schema.get(key) {
        None | Some(Value::Bool(_)) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n.clone())),
        Some(_) => Err(fail(path, format!("`{key}` must be a number"))),
    }
}

impl Range {
    /// The bounds a number or integer schema declares; `None` when it declares none.
    pub(super) fn of(
        schema: &Map<String, Value>,
        integer: bool,
        path: &str,
    ) -> Result<Option<Self>, SchemaError> {
        let (mut lo, mut hi) = (i128::MIN, i128::MAX);
        let mut declared = false;
        // Draft 4 spells exclusive bounds as booleans beside `minimum`/`maximum`.
        let draft4 = |key| schema.get(key) == Some(&Value::Bool(true));
        if let Some(n) = number(schema, "minimum", path)? {
            let (value, exact) = units(&n);
            lo = lo.max(if draft4("exclusiveMinimum") || !exact {
                value + 1
            } else {
                value
            });
            declared = true;
        }
        if let Some(n) = number(schema, "exclusiveMinimum", path)? {
            lo = lo.max(units(&n).0 + 1);
            declared = true;
        }
        if let Some(n) = number(schema, "maximum", path)? {
            let (value, exact) = units(&n);
            hi = hi.min(if draft4("exclusiveMaximum") && exact {
                value - 1
            } else {
                value
            });
            declared = true;
        }
        if let Some(n) = number(schema, "exclusiveMaximum", path)? {
            let (value, exact) = units(&n);
            hi = hi.min(if exact { value - 1 } else { value });
            declared = true;
        }
        let mut step = if integer { SCALE } else { 1 };
        if let Some(n) = number(schema, "multipleOf", path)? {
            let (value, exact) = units(&n);
            if n.as_f64().is_none_or(|f| f <= 0.0) {
                return Err(fail(path, "`multipleOf` must be greater than 0"));
            }
            if !exact || value == 0 || value > pow10(MAX_DIGITS) * SCALE {
                return Err(fail(
                    path,
                    format!("`multipleOf` {n} is not supported: runner writes numbers of at most {MAX_DIGITS} digits either side of the point, so the step must be a multiple of 10^-{MAX_DIGITS} and at most 10^{MAX_DIGITS}"),
                ));
            }
            step = step / gcd(step, value) * value;
            declared = true;
        }
        if !declared {
            return Ok(None);
        }
        let largest = if integer {
            (pow10(MAX_DIGITS) - 1) * SCALE
        } else {
            pow10(MAX_DIGITS) * SCALE - 1
        };
        let (lo, hi) = (lo.max(-largest), hi.min(largest));
        // The nearest multiples of the step inside the bounds.
        let (lo, hi) = (-((-lo).div_euclid(step)) * step, hi.div_euclid(step) * step);
        if lo > hi {
            let what = if integer { "integer" } else { "number" };
            let multiple = if step > 1 && !(integer && step == SCALE) {
                " and is a multiple of `multipleOf`"
            } else {
                ""
            };
            return Err(fail(
                path,
                format!("no {what} (of at most {MAX_DIGITS} digits either side of the point) lies within `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`{multiple}"),
            ));
        }
        Ok(Some(Range {
            lo,
            hi,
            step,
            integer,
        }))
    }

    /// Every integer of at most [`MAX_DIGITS`] digits: the range of an unbounded
    /// integer whose values must be told apart (`uniqueItems`).
    pub(super) fn whole_integers() -> Self {
        let largest = (pow10(MAX_DIGITS) - 1) * SCALE;
        Range {
            lo: -largest,
            hi: largest,
            step: SCALE,
            integer: true,
        }
    }

    /// How many multiples of the step lie within `[a, b]` and the bounds.
    fn count_within(&self, a: i128, b: i128) -> i128 {
        let (a, b) = (a.max(self.lo), b.min(self.hi));
        if a > b {
            return 0;
        }
        // floor(b / step) - ceil(a / step) + 1
        b.div_euclid(self.step) + (-a).div_euclid(self.step) + 1
    }

    /// How many values the range holds.
    pub(super) fn count(&self) -> i128 {
        self.count_within(self.lo, self.hi)
    }

    /// How many values within the range an integer that starts with `text` can become.
    pub(super) fn count_from(&self, text: &Decimal) -> i128 {
        debug_assert!(self.integer);
        // The magnitudes each way of going on reaches, as signed values in units.
        let within = |a: i128, b: i128| {
            if text.negative {
                self.count_within(-b * SCALE, -(a.max(1)) * SCALE)
            } else {
                self.count_within(a * SCALE, b * SCALE)
            }
        };
        match text.phase {
            Phase::Sign => within(1, pow10(MAX_DIGITS) - 1),
            Phase::Int if text.int == 0 => within(0, 0),
            Phase::Int => (0..=MAX_DIGITS - text.int_digits)
                .map(|k| {
                    let first = i128::from(text.int) * pow10(k);
                    within(first, first + pow10(k) - 1)
                })
                .sum(),
            Phase::Dot | Phase::Fraction => 0,
        }
    }

    /// Whether a number that starts with `text` may lie within the bounds.
    fn reachable(&self, text: &Decimal) -> bool {
        let overlaps = |a: i128, b: i128| {
            // `-0` is not written: a minus sign leads to a value below zero.
            let (a, b) = if text.negative {
                (-b, -a.max(1))
            } else {
                (a, b)
            };
            // The first multiple of the step from where the two ranges overlap.
            let from = a.max(self.lo);
            let first = -((-from).div_euclid(self.step)) * self.step;
            a <= b && first <= b.min(self.hi)
        };
        // The values each way of going on can reach, by magnitude.
        let whole = |p: i128| {
            if self.integer {
                p * SCALE
            } else {
                p * SCALE + SCALE - 1
            }
        };
        match text.phase {
            Phase::Sign => overlaps(0, whole(pow10(MAX_DIGITS) - 1)),
            Phase::Int if text.int == 0 => overlaps(0, whole(0)),
            Phase::Int => (0..=MAX_DIGITS - text.int_digits).any(|k| {
                let first = i128::from(text.int) * pow10(k);
                overlaps(first * SCALE, whole(first + pow10(k) - 1))
            }),
            Phase::Dot => overlaps(i128::from(text.int) * SCALE, whole(i128::from(text.int))),
            Phase::Fraction => {
                let unit = pow10(MAX_DIGITS - text.fraction_digits);
                let first = i128::from(text.int) * SCALE + i128::from(text.fraction) * unit;
                overlaps(first, first + unit - 1)
            }
        }
    }

    /// Whether `text`, ended here, is a number within the bounds.
    fn contains(&self, text: &Decimal) -> bool {
        let magnitude = match text.phase {
            Phase::Int => i128::from(text.int) * SCALE,
            Phase::Fraction => {
                i128::from(text.int) * SCALE
                    + i128::from(text.fraction) * pow10(MAX_DIGITS - text.fraction_digits)
            }
            Phase::Sign | Phase::Dot => return false,
        };
        let value = if text.negative { -magnitude } else { magnitude };
        !(text.negative && magnitude == 0)
            && (self.lo..=self.hi).contains(&value)
            && value.rem_euclid(self.step) == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// After `-`.
    Sign,
    Int,
    /// After the point.
    Dot,
    Fraction,
}

/// A bounded number's text so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decimal {
    negative: bool,
    phase: Phase,
    int_digits: u8,
    int: u64,
    fraction_digits: u8,
    fraction: u64,
    /// The text ended here would be a number within the bounds.
    pub(super) complete: bool,
}

impl Decimal {
    /// The integer written so far, if the text is one (`-` alone is not).
    pub(super) fn integer(&self) -> Option<i64> {
        let magnitude = i64::try_from(self.int).ok()?;
        match self.phase {
            Phase::Int if self.negative => Some(-magnitude),
            Phase::Int => Some(magnitude),
            _ => None,
        }
    }

    /// Whether the integer `value`, written plainly, starts with this text.
    pub(super) fn leads_to(&self, value: i64) -> bool {
        if self.negative != (value < 0) {
            return false;
        }
        match self.phase {
            Phase::Sign => true,
            Phase::Int => {
                // The value's leading `int_digits` digits, without formatting either.
                let magnitude = value.unsigned_abs();
                let mut digits = 1u8;
                let mut reach = 10u64;
                while digits < 20 && magnitude >= reach {
                    digits += 1;
                    reach = reach.saturating_mul(10);
                }
                digits >= self.int_digits
                    && magnitude / 10u64.pow(u32::from(digits - self.int_digits)) == self.int
            }
            Phase::Dot | Phase::Fraction => false,
        }
    }

    /// A number starting with `b`, if one within `range` can.
    pub(super) fn start(range: &Range, b: u8) -> Option<Self> {
        let empty = Decimal {
            negative: false,
            phase: Phase::Sign,
            int_digits: 0,
            int: 0,
            fraction_digits: 0,
            fraction: 0,
            complete: false,
        };
        match b {
            b'-' => {
                let text = Decimal {
                    negative: true,
                    ..empty
                };
                range.reachable(&text).then_some(text)
            }
            _ => empty.step(range, b),
        }
    }

    /// The text after one more byte, if a number within `range` can still follow.
    pub(super) fn step(mut self, range: &Range, b: u8) -> Option<Self> {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'));
        match (self.phase, digit, b) {
            (Phase::Sign, Some(d), _) => {
                (self.phase, self.int, self.int_digits) = (Phase::Int, d, 1);
            }
            // No leading zeros.
            (Phase::Int, Some(d), _) if self.int != 0 && self.int_digits < MAX_DIGITS => {
                self.int = self.int * 10 + d;
                self.int_digits += 1;
            }
            (Phase::Int, None, b'.') if !range.integer => self.phase = Phase::Dot,
            (Phase::Dot, Some(d), _) => {
                (self.phase, self.fraction, self.fraction_digits) = (Phase::Fraction, d, 1);
            }
            (Phase::Fraction, Some(d), _) if self.fraction_digits < MAX_DIGITS => {
                self.fraction = self.fraction * 10 + d;
                self.fraction_digits += 1;
            }
            _ => return None,
        }
        if !range.reachable(&self) {
            return None;
        }
        self.complete = range.contains(&self);
        Some(self)
    }
}
