//! Float vectors as JSON, compactly: each `f32` written with the fewest digits that
//! round-trip, not as the long decimal of its `f64` widening.

use serde_json::{Number, Value};

pub fn f32_value(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    // Rust's Display for f32 is the shortest round-trip form; reading it back as f64 keeps it.
    let shortest: f64 = format!("{x}").parse().unwrap_or(x as f64);
    Number::from_f64(shortest)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

pub fn f32_array(xs: &[f32]) -> Value {
    Value::Array(xs.iter().copied().map(f32_value).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn shortest() {
        assert_eq!(
            serde_json::to_string(&super::f32_array(&[0.1, 1.0, -2.5e-8])).unwrap(),
            "[0.1,1.0,-2.5e-8]"
        );
    }
}
