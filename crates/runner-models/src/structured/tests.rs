use rand::{Rng, SeedableRng};
use serde_json::json;

use super::*;

fn grammar(schema: Value) -> Grammar {
    Grammar::compile(&schema).unwrap_or_else(|e| panic!("{schema}: {e}"))
}

/// Whether `text` is, as a whole, a match.
fn matches(g: &Grammar, text: &str) -> bool {
    let mut m = g.matcher();
    m.feed_all(g, text.as_bytes()) && m.can_finish()
}

/// Whether `text` could still become a match.
fn prefix(g: &Grammar, text: &str) -> bool {
    g.matcher().feed_all(g, text.as_bytes())
}

/// What OpenAI's Python SDK sends for a Pydantic model (strict mode): `$defs`, `$ref`,
/// `anyOf` with null, enums, nested arrays of objects, additionalProperties false.
fn pydantic_schema() -> Value {
    json!({
        "$defs": {
            "Step": {
                "properties": {
                    "explanation": {"title": "Explanation", "type": "string"},
                    "output": {"title": "Output", "type": "string"}
                },
                "required": ["explanation", "output"],
                "title": "Step", "type": "object", "additionalProperties": false
            },
            "Mood": {"enum": ["happy", "sad"], "title": "Mood", "type": "string"}
        },
        "properties": {
            "steps": {"items": {"$ref": "#/$defs/Step"}, "title": "Steps", "type": "array"},
            "final_answer": {"title": "Final Answer", "type": "string"},
            "mood": {"$ref": "#/$defs/Mood"},
            "confidence": {"anyOf": [{"type": "number"}, {"type": "null"}], "title": "Confidence"},
            "count": {"type": "integer"},
            "done": {"type": "boolean"}
        },
        "required": ["steps", "final_answer", "mood", "confidence", "count", "done"],
        "title": "Answer", "type": "object", "additionalProperties": false
    })
}

#[test]
fn valid_documents_match_compact_and_indented() {
    let g = grammar(pydantic_schema());
    let doc = json!({
        "steps": [{"explanation": "add \"2\"\n", "output": "4 ✓"}, {"output": "", "explanation": "é\u{1F600}"}],
        "final_answer": "x = -3.5e+2",
        "mood": "sad",
        "confidence": null,
        "count": -12,
        "done": true
    });
    let compact = serde_json::to_string(&doc).unwrap();
    let pretty = serde_json::to_string_pretty(&doc).unwrap();
    assert!(matches(&g, &compact), "{compact}");
    assert!(matches(&g, &pretty), "{pretty}");
    // Properties in any order, escapes of every kind.
    assert!(
        !matches(
            &g,
            r#"{"done":false,"count":0,"confidence":0.25,"mood":"happy","final_answer":"a\\b\/c\t\u00e9\ud83d","steps":[]}"#
        ),
        "a lone high surrogate escape is refused"
    );
    assert!(matches(
        &g,
        r#"{"done":false,"count":0,"confidence":1E-3,"mood":"happy","final_answer":"a\\b\/c\t\u00e9","steps":[]}"#
    ));
}

#[test]
fn invalid_documents_are_refused_at_the_first_wrong_byte() {
    let g = grammar(pydantic_schema());
    // Unknown key, with additionalProperties false.
    assert!(!prefix(&g, r#"{"step"#) || prefix(&g, r#"{"steps"#));
    assert!(!prefix(&g, r#"{"stepz"#));
    assert!(!prefix(&g, r#"{"other"#));
    // A required key missing at the close.
    assert!(!prefix(
        &g,
        r#"{"steps":[],"final_answer":"","mood":"sad","confidence":null,"count":1}"#
    ));
    // A key twice.
    assert!(!prefix(&g, r#"{"count":1,"count""#));
    // Wrong types.
    assert!(!prefix(&g, r#"{"count":1."#));
    assert!(!prefix(&g, r#"{"count":"#) || !prefix(&g, r#"{"count":""#));
    assert!(!prefix(&g, r#"{"done":tru "#));
    assert!(!prefix(&g, r#"{"mood":"angry"#));
    assert!(!prefix(&g, r#"{"confidence":nul1"#));
    // JSON's own rules: leading zeros, trailing commas, raw control characters, bad escapes.
    assert!(!prefix(&g, r#"{"count":01"#));
    assert!(!prefix(&g, r#"{"steps":[],}"#));
    assert!(!prefix(
        &g,
        r#"{"steps":[{"output":"a","explanation":"b"},]"#
    ));
    assert!(!prefix(&g, "{\"final_answer\":\"a\nb"));
    assert!(!prefix(&g, r#"{"final_answer":"\x"#));
    assert!(!prefix(&g, r#"{"final_answer":"\u12G"#));
    // Bytes that are not UTF-8: a lone continuation byte, an overlong form, a surrogate.
    for bad in [&b"\x80"[..], b"\xC0\xAF", b"\xED\xA0\x80", b"\xF5"] {
        let mut text = br#"{"final_answer":""#.to_vec();
        text.extend_from_slice(bad);
        assert!(!g.matcher().feed_all(&g, &text), "{bad:?}");
    }
    // Nothing after the value, not even whitespace.
    let whole =
        r#"{"steps":[],"final_answer":"","mood":"sad","confidence":null,"count":1,"done":true}"#;
    assert!(matches(&g, whole));
    assert!(!prefix(&g, &format!("{whole} ")));
    let mut m = g.matcher();
    assert!(m.feed_all(&g, whole.as_bytes()) && m.is_done());
}

#[test]
fn a_refused_byte_leaves_the_matcher_unchanged() {
    let g = grammar(json!({"type": "array", "items": {"type": "integer"}}));
    let mut m = g.matcher();
    assert!(m.feed_all(&g, b"[1"));
    let before = m.clone();
    assert!(!m.feed(&g, b'.'));
    assert!(!m.feed_all(&g, b"2x"));
    assert_eq!(m, before);
    assert!(m.feed_all(&g, b"2, 3]"));
    assert!(m.can_finish());
}

#[test]
fn numbers_strings_and_arrays_keep_their_bounds() {
    let g = grammar(json!({"type": "string", "minLength": 2, "maxLength": 3}));
    assert!(!matches(&g, r#""a""#));
    assert!(matches(&g, r#""ab""#));
    assert!(matches(&g, r#""a\u00e9""#), "an escape is one character");
    assert!(matches(&g, "\"日本語\""), "characters, not bytes");
    assert!(!prefix(&g, r#""abcd"#));
    let g = grammar(json!({"type": "array", "minItems": 1, "maxItems": 2}));
    assert!(!matches(&g, "[]"));
    assert!(matches(&g, "[1, {\"a\": [null]}]"));
    assert!(!prefix(&g, "[1,2,"));
    let g = grammar(
        json!({"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}], "items": false}),
    );
    assert!(matches(&g, r#"["a",true]"#));
    assert!(matches(&g, r#"["a"]"#));
    assert!(!prefix(&g, r#"["a",true,"#));
    assert!(!prefix(&g, "[true"));
    let g = grammar(json!({"type": "integer"}));
    assert!(matches(&g, "-0") && matches(&g, "123") && !prefix(&g, "1e5") && !prefix(&g, "1.0"));
    assert!(matches(&g, "123456789012345") && !prefix(&g, "1234567890123456"));
    let g = grammar(json!({"type": "number"}));
    for ok in ["0", "-1.5", "2e10", "3.25E-7", "1e+2"] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in ["+1", ".5", "1.", "1e", "--1", "0x1"] {
        assert!(!matches(&g, bad), "{bad}");
    }
    // A top-level number may go on, so it can finish but is not done.
    let mut m = g.matcher();
    assert!(m.feed_all(&g, b"12") && m.can_finish() && !m.is_done());
}

#[test]
fn patterns_are_followed_as_ecma_262_reads_them() {
    let g = grammar(json!({"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"}));
    assert!(matches(&g, r#""ABC-1234""#));
    assert!(
        !prefix(&g, r#""AB1"#),
        "refused at the first wrong character"
    );
    assert!(!prefix(&g, r#""ABC-12345"#), "no match could follow");
    assert!(prefix(&g, r#""ABC-12"#) && !matches(&g, r#""ABC-12""#));
    assert!(
        !prefix(&g, "\"ABC-\u{0661}"),
        "`\\d` is ASCII digits, as in ECMA-262"
    );
    // Not anchored: any part of the text may match.
    let g = grammar(json!({"type": "string", "pattern": "cat"}));
    assert!(matches(&g, r#""a cat!""#) && matches(&g, r#""cat""#));
    assert!(prefix(&g, r#""dog"#) && !matches(&g, r#""dog""#));
    let g = grammar(json!({"type": "string", "pattern": "^abc"}));
    assert!(!prefix(&g, r#""x"#) && matches(&g, r#""abcdef""#));
    // `.` is no line terminator; escapes are the characters they stand for.
    let g = grammar(json!({"type": "string", "pattern": "^a.b$"}));
    assert!(matches(&g, r#""a b""#) && matches(&g, "\"aéb\""));
    assert!(!prefix(&g, r#""a\n"#) && matches(&g, r#""a\tb""#));
    let g = grammar(json!({"type": "string", "pattern": "^\"q\"/$"}));
    assert!(matches(&g, r#""\"q\"/""#) && matches(&g, r#""\"q\"\/""#));
    // A backslash only where some escape can still lead to a match.
    let g = grammar(json!({"type": "string", "pattern": "^[a-z]*$"}));
    assert!(!prefix(&g, r#""ab\"#) && matches(&g, r#""ab""#) && matches(&g, "\"\""));
    // With lengths: a match of the right length must stay within reach.
    let g = grammar(json!({"type": "string", "pattern": "^a+$", "maxLength": 3}));
    assert!(matches(&g, r#""aaa""#) && !prefix(&g, r#""aaaa"#));
    let g =
        grammar(json!({"type": "string", "pattern": "^(ab)*$", "minLength": 3, "maxLength": 4}));
    assert!(matches(&g, r#""abab""#) && !matches(&g, r#""ab""#));
    let g = grammar(json!({"type": "string", "pattern": "x", "minLength": 4, "maxLength": 4}));
    assert!(prefix(&g, r#""abc"#) && !prefix(&g, r#""abcd"#) && matches(&g, r#""abcx""#));
    // Classes: ECMA-262's literal `[` and `&`, escaped punctuation, `\u` escapes.
    let g = grammar(json!({"type": "string", "pattern": "^[[&\\-]\\.\\u0041$"}));
    assert!(matches(&g, r#""[.A""#) && matches(&g, r#""&.A""#) && matches(&g, r#""-.A""#));
    assert!(!prefix(&g, r#""b"#));
    // Lookaheads at the start of an anchored pattern: the one Pydantic 2 gave `Decimal`…
    let g = grammar(json!({"type": "string", "pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$"}));
    assert!(matches(&g, r#""12.5""#) && matches(&g, r#""-0.5""#) && matches(&g, r#""7""#));
    assert!(prefix(&g, r#""-"#) && !matches(&g, r#""-""#) && !matches(&g, "\"\""));
    assert!(!matches(&g, r#""+.""#) && !prefix(&g, r#""1x"#));
    // …a password rule…
    let g = grammar(json!({"type": "string", "pattern": "^(?=.*[A-Z])(?=.*\\d).{8,}$"}));
    assert!(matches(&g, r#""Abcdefg1""#) && matches(&g, r#""12345678X""#));
    assert!(prefix(&g, r#""abcdefgh"#) && !matches(&g, r#""abcdefgh""#));
    assert!(!matches(&g, r#""Abcdefgh""#) && !matches(&g, r#""Ab1""#));
    // …and a name that must not start a certain way.
    let g = grammar(json!({"type": "string", "pattern": "^(?!admin)[a-z]+$"}));
    assert!(matches(&g, r#""user""#) && matches(&g, r#""admi""#));
    assert!(!matches(&g, r#""admin""#) && !prefix(&g, r#""adminx"#));
    // Anywhere else a lookahead is refused.
    let e = Grammar::compile(&json!({"type": "string", "pattern": "a(?=b)"})).unwrap_err();
    assert!(e.message.contains("lookaround"), "{e}");
    // In an object, and beside `null`.
    let g = grammar(json!({
        "type": "object",
        "properties": {"id": {"type": ["string", "null"], "pattern": "^id-[0-9]+$"}},
        "required": ["id"],
        "additionalProperties": false
    }));
    assert!(matches(&g, r#"{"id": "id-42"}"#) && matches(&g, r#"{"id": null}"#));
    assert!(!prefix(&g, r#"{"id": "x"#));
}

#[test]
fn bounded_numbers_stay_within_their_bounds() {
    let g = grammar(json!({"type": "integer", "minimum": 1, "maximum": 5}));
    for ok in ["1", "3", "5"] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in ["0", "6", "-", "10", "1.5", "1e0"] {
        assert!(!prefix(&g, bad), "{bad}");
    }
    let g = grammar(json!({"type": "number", "minimum": 0, "maximum": 1}));
    for ok in ["0", "0.5", "1", "1.0", "1.000", "0.000000000000001"] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in ["-", "2", "1.01", "1.5", "0.5e1", "00"] {
        assert!(!prefix(&g, bad), "{bad}");
    }
    // Exclusive bounds, and draft 4's boolean spelling of them.
    for schema in [
        json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5}),
        json!({"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 0.5, "exclusiveMaximum": true}),
    ] {
        let g = grammar(schema);
        let mut m = g.matcher();
        assert!(
            m.feed_all(&g, b"0") && !m.can_finish(),
            "0 is excluded but 0.1 is not"
        );
        assert!(matches(&g, "0.1") && matches(&g, "0.4999") && !prefix(&g, "0.5"));
    }
    let g = grammar(json!({"type": "integer", "exclusiveMaximum": 10}));
    assert!(matches(&g, "9") && matches(&g, "-123456") && !matches(&g, "10"));
    // Negative ranges: `-` first, and values away from zero compared the right way.
    let g = grammar(json!({"type": "number", "minimum": -2.5, "maximum": -0.25}));
    assert!(matches(&g, "-2.5") && matches(&g, "-0.25") && matches(&g, "-1"));
    assert!(!prefix(&g, "0") && !prefix(&g, "-2.51") && !prefix(&g, "-0.1") && !prefix(&g, "-3"));
    // Fractional bounds of an integer round inwards; huge bounds are no bound.
    let g = grammar(json!({"type": "integer", "minimum": -1.5, "maximum": 2.5}));
    assert!(matches(&g, "-1") && matches(&g, "2") && !prefix(&g, "-2") && !prefix(&g, "3"));
    let g = grammar(json!({"type": "integer", "maximum": 1e300}));
    assert!(matches(&g, "123456789012345") && matches(&g, "-5"));
    // Without a type, bounds say "number".
    let g = grammar(json!({"minimum": 10}));
    assert!(matches(&g, "10.5") && !prefix(&g, "\""));
    // In an array: the number ends at `,` or `]` only when within bounds.
    let g = grammar(json!({"type": "array", "items": {"type": "integer", "minimum": 10}}));
    assert!(matches(&g, "[10, 99]") && !prefix(&g, "[1,") && prefix(&g, "[1"));
}

#[test]
fn multiples_of_a_step_are_the_only_numbers_written() {
    let g = grammar(json!({"type": "integer", "multipleOf": 5}));
    for ok in ["0", "5", "-5", "100", "123456789012345"] {
        assert!(matches(&g, ok), "{ok}");
    }
    let mut m = g.matcher();
    assert!(
        m.feed_all(&g, b"1") && !m.can_finish(),
        "1 goes on to 10, 15, ..."
    );
    for bad in ["12", "1.5", "-0"] {
        assert!(!matches(&g, bad), "{bad}");
    }
    // Within bounds: only the multiples inside them, and no prefix that leads nowhere.
    let g = grammar(json!({"type": "integer", "minimum": 7, "maximum": 30, "multipleOf": 7}));
    for ok in ["7", "14", "21", "28"] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in ["3", "4", "0", "35"] {
        assert!(!prefix(&g, bad), "{bad}");
    }
    assert!(prefix(&g, "2") && !matches(&g, "2"));
    // Decimal steps have their exact decimal meaning (Pydantic's `Field(multiple_of=0.01)`).
    let g = grammar(json!({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}));
    for ok in ["0", "0.07", "0.1", "0.10", "1", "1.00"] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in ["0.001", "0.075", "1.01"] {
        assert!(!prefix(&g, bad), "{bad}");
    }
    // An integer with a fractional step: multiples of both.
    let g = grammar(json!({"type": "integer", "multipleOf": 1.5, "maximum": 10, "minimum": 0}));
    assert!(matches(&g, "0") && matches(&g, "3") && matches(&g, "9"));
    assert!(!matches(&g, "1") && !matches(&g, "6.5") && !prefix(&g, "10"));
    // Without a type, a step says "number".
    let g = grammar(json!({"multipleOf": 0.5}));
    assert!(matches(&g, "2.5") && !matches(&g, "2.25") && !prefix(&g, "\""));
}

#[test]
fn property_names_limit_the_keys_to_a_list() {
    // Pydantic's `dict[Literal["a", "b"], int]`.
    let g = grammar(
        json!({"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"enum": ["a", "b"]}}),
    );
    for ok in ["{}", r#"{"a": 1}"#, r#"{"b": 2, "a": 1}"#] {
        assert!(matches(&g, ok), "{ok}");
    }
    for bad in [r#"{"c"#, r#"{"ab"#, r#"{"a": 1, "a""#, r#"{"a": "x""#] {
        assert!(!prefix(&g, bad), "{bad}");
    }
    // Pydantic's `dict[SomeEnum, bool]`: the names through a `$ref`, with a count.
    let g = grammar(json!({
        "$defs": {"Key": {"enum": ["x", "y"], "title": "Key", "type": "string"}},
        "type": "object",
        "additionalProperties": {"type": "boolean"},
        "propertyNames": {"$ref": "#/$defs/Key"},
        "minProperties": 2
    }));
    assert!(matches(&g, r#"{"y": true, "x": false}"#));
    let mut m = g.matcher();
    assert!(m.feed_all(&g, br#"{"x": true"#) && !m.feed_all(&g, b"}"));
    // Declared properties outside the list are never written; any name is no limit.
    let g = grammar(
        json!({"properties": {"a": {"type": "null"}, "z": {"type": "null"}}, "additionalProperties": false, "propertyNames": {"const": "a"}}),
    );
    assert!(matches(&g, r#"{"a": null}"#) && !prefix(&g, r#"{"z"#));
    let g = grammar(json!({"type": "object", "propertyNames": {"type": "string"}}));
    assert!(matches(&g, r#"{"anything": 1}"#));
    // Other name constraints, and names the list forbids but `required` asks for.
    for (schema, message) in [
        (
            json!({"type": "object", "propertyNames": {"pattern": "^a"}}),
            "enforced as an `enum` or `const`",
        ),
        (
            json!({"type": "object", "propertyNames": {"enum": ["a"]}, "required": ["b"]}),
            "`b` is required but `propertyNames` does not allow it",
        ),
    ] {
        let e = Grammar::compile(&schema).unwrap_err();
        assert!(e.message.contains(message), "{schema}: {e}");
    }
}

#[test]
fn unique_items_are_never_repeated() {
    // Strings: a repeated one is refused at its closing quote, and may go on instead.
    let g = grammar(json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}));
    assert!(matches(&g, r#"["a","b","ab"]"#));
    assert!(!prefix(&g, r#"["a","a""#) && prefix(&g, r#"["a","ab""#));
    // Compared as decoded text: escapes are the characters they stand for.
    for (first, again) in [
        ("A", r"\u0041"),
        ("/", r"\/"),
        (r"\n", r"\u000a"),
        ("é", r"\u00e9"),
    ] {
        assert!(
            !prefix(&g, &format!(r#"["{first}","{again}""#)),
            "{first} and {again}"
        );
    }
    // Each array its own: nested and sibling arrays do not share their items.
    let g = grammar(
        json!({"type": "array", "items": {"type": "array", "items": {"type": "string"}, "uniqueItems": true}}),
    );
    assert!(matches(&g, r#"[["a","b"],["a","b"]]"#));
    assert!(!prefix(&g, r#"[["a"],["b","b""#));
    // Values of an enum: a used one does not start, and no comma once all are used.
    let g =
        grammar(json!({"type": "array", "items": {"enum": ["x", "y", 1]}, "uniqueItems": true}));
    assert!(matches(&g, r#"["x", 1, "y"]"#));
    assert!(prefix(&g, r#"["x",""#) && !prefix(&g, r#"["x","x"#));
    assert!(!prefix(&g, r#"[1,1"#) && !prefix(&g, r#"["x",1,"y","#));
    // An enum listing a value twice offers it once.
    let g = grammar(json!({"type": "array", "items": {"enum": ["x", "x"]}, "uniqueItems": true}));
    assert!(matches(&g, r#"["x"]"#) && !prefix(&g, r#"["x","#));
    // Integers (Pydantic's `set[int]`): an integer already in the array cannot end, and a
    // digit is taken only while the integers it can still become are not all in it.
    let g = grammar(json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}));
    assert!(matches(&g, "[1, 2, 12, -1, 0]"));
    for repeated in ["[1, 1]", "[1, 1,", "[7, -3, -3 ", "[0, 0"] {
        assert!(!prefix(&g, repeated), "{repeated}");
    }
    assert!(
        matches(&g, "[1, 10]") && prefix(&g, "[1, 1"),
        "1 goes on to 10"
    );
    assert!(
        !prefix(&g, "[123456789012345, 123456789012345"),
        "15 digits cannot go on"
    );
    assert!(matches(&g, "[123456789012345, 123456789012346]"));
    // Within a range: no prefix whose every integer is taken, no comma once all are.
    let g = grammar(
        json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 12}, "uniqueItems": true}),
    );
    assert!(!prefix(&g, "[1, 10, 11, 12, 1") && prefix(&g, "[1, 10, 12, 1"));
    let g = grammar(
        json!({"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 1}, "uniqueItems": true, "minItems": 3}),
    );
    assert!(matches(&g, "[1, -1, 0]") && !prefix(&g, "[1, -1, 0,") && !prefix(&g, "[1, -1, -"));
    // Arrays in arrays keep their own items.
    let g = grammar(
        json!({"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true}}),
    );
    assert!(matches(&g, "[[1, 2], [1, 2]]") && !prefix(&g, "[[1, 2], [2, 2]"));
    // What cannot be held to it without dead ends is refused, and so is the impossible.
    for (schema, message) in [
        (
            json!({"type": "array", "items": {"type": "number"}, "uniqueItems": true}),
            "enforced for arrays of strings",
        ),
        (
            json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3}, "uniqueItems": true, "minItems": 4}),
            "more unique items than the 3 integers",
        ),
        (
            json!({"type": "array", "items": {"type": "string", "maxLength": 3}, "uniqueItems": true}),
            "enforced for arrays of strings",
        ),
        (
            json!({"type": "array", "uniqueItems": true}),
            "enforced for arrays of strings",
        ),
        (
            json!({"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": true, "minItems": 3}),
            "more unique items than the 2",
        ),
        (
            json!({"type": "array", "prefixItems": [{"type": "string"}], "uniqueItems": true}),
            "beside `prefixItems`",
        ),
        (
            json!({"type": "array", "items": {"type": "string"}, "uniqueItems": "yes"}),
            "true or false",
        ),
    ] {
        let e = Grammar::compile(&schema).unwrap_err();
        assert!(e.message.contains(message), "{schema}: {e}");
    }
    // Pydantic's `set[str]` and `set[Literal[...]]`, as OpenAI's SDK sends them.
    let g = grammar(
        json!({"properties": {"tags": {"items": {"type": "string"}, "type": "array", "uniqueItems": true}, "colors": {"items": {"enum": ["red", "green"], "type": "string"}, "type": "array", "uniqueItems": true}}, "required": ["tags", "colors"], "type": "object", "additionalProperties": false}),
    );
    assert!(matches(
        &g,
        r#"{"tags": ["a", "b"], "colors": ["green", "red"]}"#
    ));
    assert!(!prefix(&g, r#"{"tags": ["a", "a""#));
}

#[test]
fn objects_hold_their_number_of_keys() {
    // Pydantic's `dict[str, int] = Field(min_length=1, max_length=2)`.
    let g = grammar(
        json!({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1, "maxProperties": 2}),
    );
    assert!(!matches(&g, "{}") && matches(&g, r#"{"a": 1}"#) && matches(&g, r#"{"a": 1, "b": 2}"#));
    assert!(!prefix(&g, r#"{"a": 1, "b": 2,"#));
    assert!(
        !prefix(&g, "{ }"),
        "no whitespace where only a key may follow"
    );
    // Declared and other keys count alike; required ones count toward the minimum.
    let g = grammar(
        json!({"type": "object", "properties": {"x": {"type": "null"}, "y": {"type": "null"}}, "required": ["x"], "minProperties": 2, "maxProperties": 2}),
    );
    assert!(!matches(&g, r#"{"x": null}"#) && matches(&g, r#"{"x": null, "other": 3}"#));
    assert!(matches(&g, r#"{"y": null, "x": null}"#) && !prefix(&g, r#"{"x": null, "y": null,"#));
    // maxProperties 0: only `{}`.
    let g = grammar(json!({"type": "object", "maxProperties": 0}));
    assert!(matches(&g, "{}") && !prefix(&g, r#"{""#));
    for (schema, message) in [
        (
            json!({"type": "object", "minProperties": 3, "maxProperties": 2}),
            "above `maxProperties`",
        ),
        (
            json!({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1}),
            "more properties are required",
        ),
        (
            json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false, "minProperties": 2}),
            "more keys than `properties` has",
        ),
    ] {
        let e = Grammar::compile(&schema).unwrap_err();
        assert!(e.message.contains(message), "{schema}: {e}");
    }
    // A minimum met only by keys whose values nest: counted in the nesting a value needs.
    let mut schema = json!({"type": "null"});
    for _ in 0..63 {
        schema = json!({"type": "object", "additionalProperties": schema, "minProperties": 1});
    }
    assert_eq!(
        grammar(schema.clone()).min_depth[grammar(schema).root as usize],
        63
    );
}

#[test]
fn dates_times_and_uuids_follow_their_formats() {
    let g = grammar(json!({"type": "string", "format": "date"}));
    for ok in [
        "2024-02-29",
        "2023-12-31",
        "0001-01-01",
        "2000-02-29",
        "2023-04-30",
    ] {
        assert!(matches(&g, &format!("\"{ok}\"")), "{ok}");
    }
    for bad in [
        "2023-02-29",
        "1900-02-29",
        "2023-04-31",
        "2023-13-01",
        "2023-00-10",
        "2023-01-00",
        "2023-1-01",
        "2023/01/01",
        "2023-01-011",
    ] {
        assert!(!matches(&g, &format!("\"{bad}\"")), "{bad}");
    }
    let g = grammar(json!({"type": "string", "format": "time"}));
    for ok in [
        "23:59:59Z",
        "00:00:00+01:00",
        "12:30:05.123456789-08:30",
        "09:05:00.5Z",
    ] {
        assert!(matches(&g, &format!("\"{ok}\"")), "{ok}");
    }
    for bad in [
        "24:00:00Z",
        "12:60:00Z",
        "12:00:60Z",
        "12:00:00",
        "12:00:00.Z",
        "12:00:00.1234567890Z",
        "12:00:00+24:00",
        "12:00:00z",
    ] {
        assert!(!matches(&g, &format!("\"{bad}\"")), "{bad}");
    }
    let g = grammar(json!({"type": ["string", "null"], "format": "date-time"}));
    assert!(matches(&g, "\"2024-02-29T23:59:59.5+05:30\"") && matches(&g, "null"));
    assert!(!matches(&g, "\"2024-02-29 23:59:59Z\"") && !matches(&g, "\"2024-02-29\""));
    let g = grammar(json!({"format": "uuid"}));
    assert!(matches(&g, "\"123e4567-E89B-12d3-a456-426614174000\""));
    assert!(!matches(&g, "\"123e4567e89b-12d3-a456-426614174000\"") && !prefix(&g, "\"123g"));
    // A format constrains strings only: on a number it asks nothing (JSON Schema's rule).
    assert!(matches(
        &grammar(json!({"type": "integer", "format": "int32"})),
        "7"
    ));
}

#[test]
fn whitespace_is_what_json_printers_write() {
    let g = grammar(json!({"type": "object"}));
    let doc = json!({"a": [1, 2, {"b": null}], "c": {}, "d": "x y", "e": [[]]});
    // serde_json's compact and indented forms, Python's json.dumps default and indent=2.
    for text in [
        serde_json::to_string(&doc).unwrap(),
        serde_json::to_string_pretty(&doc).unwrap(),
        r#"{"a": [1, 2, {"b": null}], "c": {}, "d": "x y", "e": [[]]}"#.to_string(),
        "{\n\t\"a\": [\n\t\t1,\n\t\t2\n\t]\n}".to_string(),
        "{ \"a\": [ 1, 2 ] }".to_string(),
    ] {
        assert!(matches(&g, &text), "{text}");
    }
    let indent = " ".repeat(MAX_INDENT as usize);
    assert!(prefix(&g, &format!("{{\n{indent}")));
    assert!(!prefix(&g, &format!("{{\n{indent} ")));
    for bad in [
        "{  ",          // two spaces
        "{\n\n",        // a blank line
        "{ \n",         // a space, then a newline
        "{\r\n",        // a carriage return
        "{\"a\" :",     // before `:`
        "{\"a\":  ",    // two spaces after it
        "{\"a\":\n",    // a newline after it
        "{\"a\": 1\n,", // before `,`
        "[1 ,",         // before `,` in an array
        " {",           // before the value
        "\n{",
    ] {
        assert!(!prefix(&g, bad), "{bad:?}");
    }
    assert!(matches(&g, "{\"a\": 1\n}"), "before a closing bracket");
    assert!(
        matches(&grammar(json!({})), "[1 ]"),
        "before a closing bracket"
    );
    // Never whitespace that leads nowhere: before `}` while a required key is missing.
    let g = grammar(
        json!({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"]}),
    );
    assert!(prefix(&g, "{\"a\": 1,") && !prefix(&g, "{\"a\": 1 "));
    let g = grammar(json!({"type": "array", "minItems": 2}));
    assert!(!prefix(&g, "[1 ") && prefix(&g, "[1, 2 "));
    // Inside strings spaces are text.
    let g = grammar(json!({"type": "object"}));
    assert!(matches(&g, &format!("{{\"a\":\"{}\"}}", "  ".repeat(200))));
}

#[test]
fn keys_may_be_other_names_when_additional_properties_allow() {
    let g = grammar(
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    );
    assert!(matches(&g, r#"{"b":"x","a":1}"#));
    assert!(
        matches(&g, r#"{"ab":[],"a":1}"#),
        "a name that starts like a property"
    );
    assert!(!prefix(&g, r#"{"a":1,"a""#), "a property twice");
    assert!(!prefix(&g, r#"{"a":"x""#), "the property's schema applies");
    assert!(!matches(&g, r#"{"b":1}"#), "required");
    let g = grammar(json!({"type": "object", "additionalProperties": {"type": "boolean"}}));
    assert!(matches(&g, r#"{"x":true,"y\"z":false}"#));
    // Another key twice, in the same object; in sibling and nested objects it is new.
    assert!(!prefix(&g, r#"{"x":true,"x""#));
    let any = grammar(json!({}));
    assert!(!prefix(&any, r#"{"a":1,"b":2,"a""#));
    assert!(matches(&any, r#"[{"a":1},{"a":{"a":[{"a":2}]}}]"#));
    assert!(!prefix(&g, r#"{"x":1"#));
    // Names that JSON escapes are matched as serde_json writes them.
    let g = grammar(
        json!({"type": "object", "properties": {"say \"hi\"": {"type": "null"}}, "additionalProperties": false}),
    );
    assert!(matches(&g, r#"{"say \"hi\"":null}"#));
    assert!(!prefix(&g, r#"{"say ""#));
}

#[test]
fn recursive_schemas_nest_up_to_the_depth_limit() {
    let g = grammar(json!({
        "$defs": {"node": {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["children"], "additionalProperties": false}},
        "$ref": "#/$defs/node"
    }));
    assert!(matches(
        &g,
        r#"{"children":[{"children":[]},{"children":[{"children":[]}]}]}"#
    ));
    // At the depth limit a property whose value cannot fit is not offered: no dead ends.
    let g = grammar(json!({
        "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}, "v": {"type": "integer"}}, "additionalProperties": false}},
        "$ref": "#/$defs/n"
    }));
    let mut m = g.matcher();
    assert!(m.feed_all(&g, "{\"c\":".repeat(MAX_DEPTH - 1).as_bytes()));
    assert!(m.feed_all(&g, b"{\""));
    assert!(!m.clone().feed(&g, b'c'), "`c` would need a 65th object");
    assert!(m.feed_all(&g, b"v\":1}"));
    let any = grammar(json!({}));
    let deep = "[".repeat(MAX_DEPTH);
    assert!(prefix(&any, &deep));
    assert!(!prefix(&any, &format!("{deep}[")));
}

#[test]
fn alternatives_literals_and_type_lists() {
    let g = grammar(json!({"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"], "additionalProperties": false},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "number"}}, "required": ["kind", "side"], "additionalProperties": false}
    ]}));
    assert!(matches(&g, r#"{"kind":"circle","r":1}"#));
    assert!(matches(&g, r#"{"kind":"square","side":2}"#));
    assert!(!prefix(&g, r#"{"kind":"circle","side""#));
    assert!(!prefix(&g, r#"{"kind":"tri"#));
    let g = grammar(json!({"type": ["string", "null"], "maxLength": 1}));
    assert!(matches(&g, "null") && matches(&g, r#""a""#) && !prefix(&g, r#""ab"#));
    let g = grammar(json!({"enum": [1, 12, "x", [1, 2], {"a": null}]}));
    for ok in ["1", "12", r#""x""#, "[1,2]", r#"{"a":null}"#] {
        assert!(matches(&g, ok), "{ok}");
    }
    assert!(
        !matches(&g, "2") && !prefix(&g, "[1, 2]"),
        "literals are compact"
    );
    let g = grammar(json!({"type": "string", "nullable": true}));
    assert!(matches(&g, "null") && matches(&g, r#""""#));
}

#[test]
fn unsupported_or_impossible_schemas_are_refused_by_name() {
    let cases = [
        (
            json!({"type": "integer", "not": {"const": 5}}),
            "#",
            "`not` is not supported",
        ),
        (
            json!({"type": "number", "multipleOf": 0}),
            "#",
            "`multipleOf` must be greater than 0",
        ),
        (
            json!({"type": "number", "multipleOf": 1e-20}),
            "#",
            "must be a multiple of 10^-15",
        ),
        (
            json!({"type": "integer", "minimum": 1, "maximum": 4, "multipleOf": 5}),
            "#",
            "is a multiple of `multipleOf`",
        ),
        (
            json!({"type": "string", "pattern": "^(a)\\1$"}),
            "#",
            "backreference",
        ),
        (
            json!({"type": "string", "pattern": "a(?!x)"}),
            "#",
            "lookaround",
        ),
        (
            json!({"type": "string", "pattern": "^a("}),
            "#",
            "not a regular expression runner can follow",
        ),
        (
            json!({"type": "string", "pattern": "^(ab)*$", "minLength": 3, "maxLength": 3}),
            "#",
            "no string of the lengths",
        ),
        (
            json!({"type": "string", "pattern": "[]"}),
            "#",
            "matches no character",
        ),
        (
            json!({"type": "string", "format": "date", "pattern": "^2"}),
            "#",
            "`pattern` beside `format`",
        ),
        (
            json!({"type": "integer", "minimum": 3, "maximum": 2}),
            "#",
            "no integer",
        ),
        (
            json!({"type": "integer", "minimum": 0.2, "maximum": 0.8}),
            "#",
            "no integer",
        ),
        (
            json!({"type": "number", "minimum": 1e20}),
            "#",
            "at most 15 digits",
        ),
        (
            json!({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}),
            "#",
            "no number",
        ),
        (
            json!({"type": "number", "maximum": "5"}),
            "#",
            "`maximum` must be a number",
        ),
        (
            json!({"properties": {"email": {"type": "string", "format": "email"}}}),
            "#/properties/email",
            "`format: \"email\"` is not supported",
        ),
        (
            json!({"type": "string", "format": "date", "maxLength": 12}),
            "#",
            "beside `format`",
        ),
        (json!({"$ref": "#"}), "#", "refers back to itself"),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}),
            "#",
            "refers back to itself",
        ),
        (
            json!({"$ref": "https://example.com/s.json"}),
            "#",
            "only local references",
        ),
        (json!({"$ref": "#/$defs/missing"}), "#", "points at nothing"),
        (json!({"type": "strnig"}), "#", "unknown type `strnig`"),
        (
            json!({"type": "string", "minLength": 3, "maxLength": 2}),
            "#",
            "no string matches",
        ),
        (
            json!({"type": "object", "required": ["a"], "additionalProperties": false}),
            "#",
            "`a` is required",
        ),
        (
            json!({"allOf": [{"type": "string"}, {"maxLength": 2}]}),
            "#",
            "`allOf`",
        ),
        (json!({"anyOf": []}), "#", "non-empty list"),
        (json!(false), "#", "allows no value"),
        (
            json!({"items": [{"type": "string"}]}),
            "#",
            "use `prefixItems`",
        ),
        (
            json!({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {}}}),
            "#",
            "beside `$ref`",
        ),
    ];
    for (schema, path, message) in cases {
        let e = Grammar::compile(&schema).unwrap_err();
        assert_eq!(e.path, path, "{schema}: {e}");
        assert!(e.to_string().contains(message), "{schema}: {e}");
    }
    // Chains a hostile request could overflow the stack with: refuse them, do not recurse.
    let defs: serde_json::Map<String, Value> = (0..5000)
        .map(|i| {
            (
                format!("d{i}"),
                json!({"$ref": format!("#/$defs/d{}", i + 1)}),
            )
        })
        .chain([("d5000".to_string(), json!({"type": "null"}))])
        .collect();
    let e = Grammar::compile(&json!({"$defs": defs, "$ref": "#/$defs/d0"})).unwrap_err();
    assert!(e.message.contains("nest more than 128"), "{e}");
    let defs: serde_json::Map<String, Value> = (0..40)
        .map(|i| {
            (
                format!("d{i}"),
                json!({"anyOf": [{"$ref": format!("#/$defs/d{}", i + 1)}]}),
            )
        })
        .chain([("d40".to_string(), json!({"type": "null"}))])
        .collect();
    let e = Grammar::compile(&json!({"$defs": defs, "$ref": "#/$defs/d0"})).unwrap_err();
    assert!(e.message.contains("more than 64 deep"), "{e}");
    // No finite value: a required child of the same kind, directly or through an array.
    for schema in [
        json!({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}}, "$ref": "#/$defs/n"}),
        json!({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"}),
    ] {
        let e = Grammar::compile(&schema).unwrap_err();
        assert!(e.message.contains("no finite JSON value"), "{e}");
    }
    // One that must nest 70 deep.
    let mut schema = json!({"type": "null"});
    for _ in 0..70 {
        schema = json!({"type": "array", "prefixItems": [schema], "minItems": 1});
    }
    let e = Grammar::compile(&schema).unwrap_err();
    assert!(e.message.contains("nests 70"), "{e}");
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("p{i}"), json!({}))).collect();
    let e = Grammar::compile(&json!({"properties": many})).unwrap_err();
    assert!(e.message.contains("at most 64"), "{e}");
    // Alternatives that multiply: 11 enums of 2 nested as anyOf of anyOf… past the limit.
    let mut schema = json!({"enum": [1, 2]});
    for _ in 0..11 {
        schema = json!({"anyOf": [schema.clone(), schema]});
    }
    let e = Grammar::compile(&schema).unwrap_err();
    assert!(e.message.contains("alternatives"), "{e}");
}

/// Generates a document by walking the matcher: at each step a random byte it allows,
/// leaning towards closing brackets and quotes once the document is long.
/// `None` when the walk wanders past 4,000 bytes (a required key it never happens on).
fn random_document(g: &Grammar, rng: &mut rand::rngs::StdRng) -> Option<Vec<u8>> {
    let mut m = g.matcher();
    let mut out = Vec::new();
    loop {
        if m.is_done() || (m.can_finish() && (out.len() > 200 || rng.random_bool(0.3))) {
            return Some(out);
        }
        let allowed: Vec<u8> = (0..=255u8).filter(|&b| m.clone().feed(g, b)).collect();
        if allowed.is_empty() && m.can_finish() {
            return Some(out); // a number at its longest
        }
        assert!(
            !allowed.is_empty(),
            "stuck after {:?}",
            String::from_utf8_lossy(&out)
        );
        // Past 120 bytes: the first closer allowed, in this order.
        let closer = b"\"}]0n".iter().copied().find(|b| allowed.contains(b));
        let b = match closer {
            Some(b) if out.len() > 120 => b,
            _ => allowed[rng.random_range(0..allowed.len())],
        };
        assert!(m.feed(g, b));
        out.push(b);
        if out.len() > 4_000 {
            return None;
        }
    }
}

#[test]
fn every_document_the_matcher_completes_is_valid_json_that_the_schema_accepts() {
    let schemas = [
        pydantic_schema(),
        json!({}),
        json!({"type": "object"}),
        json!({"type": "array", "items": {"type": ["integer", "string", "null"], "maxLength": 4}, "minItems": 1, "maxItems": 3}),
        json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"enum": ["x", 1, null]}}, "additionalProperties": {"type": "boolean"}}),
        json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"enum": ["x", 1, null]}}, "required": ["a", "b"], "additionalProperties": false}),
        json!({"$defs": {"t": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/t"}, "maxItems": 2}}, "required": ["v"], "additionalProperties": false}}, "$ref": "#/$defs/t"}),
        json!({"type": "string", "minLength": 3}),
        json!({
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{2}\\d{2,4}$"},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 100},
                "tag": {"type": "string", "pattern": "x.y", "maxLength": 6},
                "note": {"type": "string", "pattern": "^\\S+( \\S+)*$", "minLength": 2},
                "low": {"type": "number", "minimum": -2.5, "exclusiveMaximum": -0.25},
                "word": {"pattern": "^(?:cat|dog)s?\\b"},
                "any": {"type": "string", "pattern": "."}
            },
            "required": ["code", "score", "age", "tag", "note", "low", "word", "any"],
            "additionalProperties": false
        }),
        json!({"type": "array", "items": {"type": "integer", "minimum": -7, "maximum": 12}, "minItems": 3}),
        // Steps that binary floating point divides exactly, as the validator checks them.
        json!({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}, "q": {"type": "number", "multipleOf": 0.25, "minimum": -3, "maximum": 1000}, "k": {"type": "integer", "multipleOf": 1.5, "exclusiveMinimum": 0}}, "required": ["n", "q", "k"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": true, "minItems": 4}),
        json!({"$defs": {"Colour": {"enum": ["red", "green", "blue"], "type": "string"}}, "type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "propertyNames": {"$ref": "#/$defs/Colour"}, "minProperties": 1}),
        json!({"type": "object", "properties": {"any": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true, "minItems": 3}, "few": {"type": "array", "items": {"type": "integer", "minimum": -2, "maximum": 3}, "uniqueItems": true, "minItems": 5}}, "required": ["any", "few"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"scores": {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2, "maxProperties": 3}, "pick": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "integer"}}, "additionalProperties": false, "minProperties": 2}}, "required": ["scores", "pick"], "additionalProperties": false}),
        json!({"type": "object", "properties": {"amount": {"anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$"}]}, "password": {"type": "string", "pattern": "^(?=.*[A-Z])(?=.*\\d)(?!.*x).{8,12}$"}}, "required": ["amount", "password"], "additionalProperties": false}),
        json!({"type": "array", "items": {"anyOf": [{"enum": ["r", "g", "b"]}, {"const": 1}, {"type": "null"}]}, "uniqueItems": true, "minItems": 2}),
        json!({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}, "day": {"format": "date"}, "at": {"type": "string", "format": "time"}, "id": {"type": "string", "format": "uuid"}}, "required": ["when", "day", "at", "id"], "additionalProperties": false}),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for schema in schemas {
        let g = grammar(schema.clone());
        // Formats asserted too (by default JSON Schema only annotates them).
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let mut complete = 0;
        for _ in 0..150 {
            let Some(doc) = random_document(&g, &mut rng) else {
                continue;
            };
            complete += 1;
            let value: Value = serde_json::from_slice(&doc).unwrap_or_else(|e| {
                panic!(
                    "{schema}: not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&doc)
                )
            });
            assert!(
                validator.is_valid(&value),
                "{schema}: the schema refuses {}",
                String::from_utf8_lossy(&doc)
            );
        }
        assert!(
            complete >= 75,
            "{schema}: only {complete} of 150 walks ended"
        );
    }
}

/// SmolLM2's vocabulary, from the GGUF the tests fetch.
fn smollm2_vocabulary() -> (Tokenizer, Vocabulary) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2-135m-instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        path.display()
    );
    let (content, _) = crate::llama::open_gguf(&path).unwrap();
    let tokenizer = crate::llama::tokenizer::from_gguf(&content).unwrap();
    let vocabulary = Vocabulary::of(&tokenizer).unwrap();
    (tokenizer, vocabulary)
}

#[test]
fn token_bytes_are_what_the_tokenizer_decodes() {
    let (tokenizer, vocabulary) = smollm2_vocabulary();
    assert_eq!(vocabulary.len(), 49152);
    let text = "{\"naïve\": [1, 2.5e3], \"emoji\": \"🦀\"}\n  ";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| vocabulary.bytes(t).unwrap().to_vec())
        .collect();
    assert_eq!(bytes, text.as_bytes());
    // Special tokens have no bytes: structured output never contains them.
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(vocabulary.bytes(im_end).is_none());
}

#[test]
fn the_mask_is_exactly_the_tokens_that_are_allowed_one_by_one() {
    let (tokenizer, vocabulary) = smollm2_vocabulary();
    let vocabulary = Arc::new(vocabulary);
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    let g = Arc::new(grammar(pydantic_schema()));
    let text = r#"{"steps": [{"explanation": "ok", "output": "4"}], "count": 12"#;
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut constraint = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![im_end]);
    // Checked at every token boundary of a real tokenization: inside keys, strings, numbers
    // and between them.
    for (i, &id) in ids.iter().enumerate() {
        let mask = mask_checked(&constraint, vocabulary.len(), i, id);
        assert!(
            !mask[im_end as usize],
            "the end before the document is complete"
        );
        constraint.advance(id);
    }
    let rest = r#", "final_answer": "a", "mood": "happy", "confidence": null, "done": false}"#;
    for id in tokenizer.encode(rest, false).unwrap().get_ids() {
        assert!(constraint.allows(*id));
        constraint.advance(*id);
    }
    assert!(constraint.is_done());
    let mask = constraint.mask(vocabulary.len());
    assert_eq!(
        mask.iter().filter(|&&a| a).count(),
        1,
        "only the end of turn"
    );
    assert!(mask[im_end as usize]);
}

/// The mask after `i` tokens, checked against every token one by one, and holding `next`
/// (the valid document's next token).
fn mask_checked(constraint: &Constraint, len: usize, i: usize, next: u32) -> Vec<bool> {
    let mask = constraint.mask(len);
    let one_by_one: Vec<bool> = (0..len as u32).map(|t| constraint.allows(t)).collect();
    assert_eq!(mask, one_by_one, "after {i} tokens");
    assert!(
        mask[next as usize],
        "token {i} ({next}) of a valid document is masked out"
    );
    mask
}

#[test]
fn masks_follow_patterns_and_bounds_token_by_token() {
    let (tokenizer, vocabulary) = smollm2_vocabulary();
    let vocabulary = Arc::new(vocabulary);
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    let g = Arc::new(grammar(json!({
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}\\d{3}$"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "note": {"type": "string", "pattern": "\\bthere\\b", "maxLength": 20},
            "price": {"type": "number", "multipleOf": 0.05, "minimum": 0},
            "ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true}
        },
        "required": ["code", "score", "age", "note", "price", "ids"],
        "additionalProperties": false
    })));
    let text = r#"{"code": "AB123", "score": 0.75, "age": 42, "note": "hello there", "price": 12.35, "ids": [3, 14, 1, 15]}"#;
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let mut constraint = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![im_end]);
    for (i, &id) in ids.iter().enumerate() {
        mask_checked(&constraint, vocabulary.len(), i, id);
        constraint.advance(id);
    }
    assert!(constraint.is_done());
    // Tokens that would break a bound or a pattern are masked: after `"age": ` no `1`
    // (10–19 reach 18 and 19, so it stays) but no `0`; after `"code": "A` no digit.
    let mut after_age = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![im_end]);
    for id in tokenizer.encode(r#"{"age": "#, false).unwrap().get_ids() {
        after_age.advance(*id);
    }
    let zero = tokenizer.token_to_id("0").unwrap();
    let one = tokenizer.token_to_id("1").unwrap();
    assert!(!after_age.allows(zero) && after_age.allows(one));
    // After `"price": 12.3` only a 0 or a 5 (or the end) keeps it a multiple of 0.05.
    let mut after_price = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![im_end]);
    for id in tokenizer
        .encode(r#"{"price": 12.3"#, false)
        .unwrap()
        .get_ids()
    {
        after_price.advance(*id);
    }
    let five = tokenizer.token_to_id("5").unwrap();
    assert!(!after_price.allows(one) && after_price.allows(five));
    let mut after_code = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![im_end]);
    for id in tokenizer.encode(r#"{"code": "A"#, false).unwrap().get_ids() {
        after_code.advance(*id);
    }
    let mask = after_code.mask(vocabulary.len());
    assert!(
        !mask[tokenizer.token_to_id("1").unwrap() as usize]
            && mask[tokenizer.token_to_id("B").unwrap() as usize]
    );
}

/// A speed probe, not a check: `cargo test -p runner-models --lib mask_speed -- --ignored
/// --nocapture`. The full mask at the start, inside a string, a key and a number.
#[test]
#[ignore]
fn mask_speed() {
    let (tokenizer, vocabulary) = smollm2_vocabulary();
    let vocabulary = Arc::new(vocabulary);
    let g = Arc::new(grammar(pydantic_schema()));
    for text in [
        "",
        r#"{"steps": [{"explanation": "the"#,
        r#"{"steps": [], "fin"#,
        r#"{"count": 12"#,
        r#"{"count": 12, "#,
    ] {
        let mut c = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![2]);
        for id in tokenizer.encode(text, false).unwrap().get_ids() {
            assert!(c.allows(*id), "{text}");
            c.advance(*id);
        }
        let started = std::time::Instant::now();
        let mut allowed = 0;
        for _ in 0..10 {
            allowed = c.mask(vocabulary.len()).iter().filter(|&&a| a).count();
        }
        let one = std::time::Instant::now();
        for t in 0..1000 {
            std::hint::black_box(c.allows(t));
        }
        eprintln!(
            "MASK after {text:?}: {:.2} ms ({allowed} tokens allowed); allows(): {:.2} µs",
            started.elapsed().as_secs_f64() * 100.0,
            one.elapsed().as_secs_f64() * 1e3,
        );
    }
    // Inside a string held to a pattern.
    let g = Arc::new(grammar(
        json!({"type": "object", "properties": {"note": {"type": "string", "pattern": "^[A-Za-z ,.]*there[A-Za-z ,.]*$", "maxLength": 200}}}),
    ));
    let mut c = Constraint::new(Arc::clone(&g), Arc::clone(&vocabulary), vec![2]);
    for id in tokenizer
        .encode(r#"{"note": "hello"#, false)
        .unwrap()
        .get_ids()
    {
        assert!(c.allows(*id));
        c.advance(*id);
    }
    let started = std::time::Instant::now();
    let mut allowed = 0;
    for _ in 0..10 {
        allowed = c.mask(vocabulary.len()).iter().filter(|&&a| a).count();
    }
    eprintln!(
        "MASK in a pattern string: {:.2} ms ({allowed} tokens allowed)",
        started.elapsed().as_secs_f64() * 100.0
    );
}

#[test]
fn patterns_too_large_to_follow_are_refused_quickly() {
    let refusal = |schema: Value| match Grammar::compile(&schema) {
        Ok(_) => panic!("{schema} compiled"),
        Err(e) => e,
    };
    for pattern in [
        "(a|b)*a(a|b){30}",
        "\\p{L}{200}x\\p{L}{200}",
        "((((a{100}){100}){100}){100})",
    ] {
        let started = std::time::Instant::now();
        let e = refusal(json!({"type": "string", "pattern": pattern}));
        eprintln!("{pattern}: {:?}: {e}", started.elapsed());
        assert!(e.message.contains("too complex"), "{e}");
    }
    let e = refusal(json!({"type": "string", "pattern": "^x+$", "maxLength": 4_000_000}));
    assert!(e.message.contains("too large to follow"), "{e}");
    let many = format!("^{}x", "(?=.*a)".repeat(9));
    let e = refusal(json!({"type": "string", "pattern": many}));
    assert!(e.message.contains("more than 8 lookaheads"), "{e}");
    // A long but simple pattern is fine.
    assert!(Grammar::compile(&json!({"type": "string", "pattern": "^[a-z]{1000}$"})).is_ok());
    let many: serde_json::Map<String, Value> = (0..65)
        .map(|i| {
            (
                format!("p{i}"),
                json!({"type": "string", "pattern": format!("^{i}")}),
            )
        })
        .collect();
    let e = refusal(json!({ "properties": many }));
    assert!(e.message.contains("more than 64 `pattern`s"), "{e}");
    // Costly ones, many of them: the schema's time for patterns runs out first.
    let costly: serde_json::Map<String, Value> = (0..20)
        .map(|i| {
            (
                format!("p{i}"),
                json!({"type": "string", "pattern": format!("\\p{{L}}{{200}}{i}\\p{{L}}{{200}}")}),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let e = refusal(json!({ "properties": costly }));
    eprintln!("20 costly patterns: {:?}: {e}", started.elapsed());
    assert!(
        e.message.contains("too complex") || e.message.contains("took more than"),
        "{e}"
    );
}

#[test]
fn integer_prefixes_count_what_they_can_still_become() {
    let text = |range: &Range, written: &str| {
        let bytes = written.as_bytes();
        let mut text = Decimal::start(range, bytes[0]).unwrap();
        for &b in &bytes[1..] {
            text = text.step(range, b).unwrap();
        }
        text
    };
    let any = Range::whole_integers();
    let twelve = text(&any, "12");
    assert!(twelve.leads_to(12) && twelve.leads_to(123) && twelve.leads_to(129_999));
    assert!(!twelve.leads_to(1) && !twelve.leads_to(-12) && !twelve.leads_to(212));
    assert_eq!(twelve.integer(), Some(12));
    let minus = text(&any, "-");
    assert!(minus.leads_to(-5) && !minus.leads_to(5) && minus.integer().is_none());
    let zero = text(&any, "0");
    assert!(zero.leads_to(0) && !zero.leads_to(10));
    // 1..=12: "1" can become 1, 10, 11 or 12; "-" nothing.
    let integers = |schema: Value| {
        Range::of(schema.as_object().unwrap(), true, "#")
            .unwrap()
            .unwrap()
    };
    let range = integers(json!({"type": "integer", "minimum": 1, "maximum": 12}));
    assert_eq!(range.count(), 12);
    assert_eq!(range.count_from(&text(&range, "1")), 4);
    assert_eq!(range.count_from(&text(&range, "9")), 1);
    // Multiples of 5 in -20..=20: "-" can become -5, -10, -15, -20; "1" only 10 and 15.
    let range =
        integers(json!({"type": "integer", "minimum": -20, "maximum": 20, "multipleOf": 5}));
    assert_eq!(range.count(), 9);
    assert_eq!(range.count_from(&text(&range, "-")), 4);
    assert_eq!(range.count_from(&text(&range, "1")), 2);
}
