//! Structured output: a JSON Schema compiled into a byte-level matcher that decides, token
//! by token, what a generating model may emit next, so the output is JSON that matches the
//! schema (OpenAI's `response_format`, and the `json_schema` input of `candle:llama`).
//!
//! The matcher is a pushdown automaton over bytes. Each alternative it follows (`anyOf`,
//! `enum`, type lists) is a stack of frames; a byte advances every alternative and drops
//! those that cannot take it. Masks over the vocabulary come from walking a trie of the
//! tokens' bytes, so tokens sharing a prefix are checked once.
//!
//! What it supports, and what it refuses with an error naming the keyword (never ignoring
//! a constraint it would then break): see [`Grammar::compile`].

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

mod bounds;
mod pattern;

use bounds::{Decimal, Range};
use pattern::{Automaton, PatternText};

/// Nodes a schema may compile to: a bound on hostile schemas.
const MAX_NODES: usize = 4096;
/// Alternatives one value may start as (after `anyOf`/`enum`/type lists are expanded).
const MAX_ALTERNATIVES: u64 = 1024;
/// Properties one object schema may declare (the matcher tracks them in a 64-bit set).
const MAX_PROPERTIES: usize = 64;
/// Schemas nested in schemas (through `$ref` too), and `$ref`/`anyOf` chains that lead to
/// a value: bounds on the recursion a hostile schema could otherwise overflow the stack with.
const MAX_SCHEMA_DEPTH: usize = 128;
const MAX_CHAIN: usize = 64;
/// `pattern`s one schema may hold (each is compiled to an automaton of its own).
const MAX_PATTERNS: usize = 64;
/// Time all of one schema's `pattern`s may take to compile: a request's schema must not
/// hold the server up (each is bounded in size, but a large Unicode class repeated costs
/// most of a second before its bound is reached).
const PATTERN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// Nesting of objects and arrays in the output.
const MAX_DEPTH: usize = 64;
/// Whitespace between JSON tokens is what JSON printers write, compact or indented: after
/// `:` nothing or one space; before `:` and `,` nothing; after `{`, `[`, `,` and before `}`,
/// `]` nothing, one space, or a newline and at most this many spaces or tabs (llama.cpp's
/// JSON grammars allow as much). Room for readable JSON, none for a model that would
/// spend its tokens on blank lines or commas on lines of their own.
const MAX_INDENT: u8 = 20;
/// Digits in a number's integer and fraction parts (beyond them f64 loses the digits
/// anyway), and in its exponent (two: parsers refuse numbers past f64's 1e308).
const MAX_DIGITS: u8 = 15;
const MAX_EXPONENT_DIGITS: u8 = 2;

type NodeId = u32;

/// Why a schema cannot constrain generation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("JSON Schema at `{path}`: {message}")]
pub struct SchemaError {
    /// A JSON Pointer into the schema (`#` is the root).
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone)]
enum Node {
    /// Any of these (an `anyOf`, a `oneOf`, a list of types, `{}`).
    OneOf(Vec<NodeId>),
    /// One of these exact JSON texts, compact (`enum`, `const`, `true`, `null`).
    Literals(Vec<Box<[u8]>>),
    Number {
        integer: bool,
        /// `minimum`/`maximum` and their exclusive forms, if any.
        range: Option<Range>,
    },
    String {
        min: u32,
        max: u32,
    },
    /// A string whose text matches a `pattern` (and its length bounds): an index into
    /// [`Grammar::automata`].
    Pattern(u32),
    /// A string of a `format`: its text follows the format's grammar.
    Formatted(Format),
    Array {
        prefix: Vec<NodeId>,
        /// Items after the prefix; `None`: no more.
        items: Option<NodeId>,
        min: u32,
        max: u32,
        unique: Unique,
    },
    Object {
        /// Names as they appear between the quotes (JSON-escaped), and their schemas.
        properties: Vec<(Box<[u8]>, NodeId)>,
        required: u64,
        /// Other keys' schema; `None`: no other keys.
        additional: Option<NodeId>,
        /// `minProperties`/`maxProperties`: how many keys, of any kind.
        min: u32,
        max: u32,
    },
}

/// `uniqueItems`, as the matcher enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unique {
    No,
    /// Asked for; what the items are is known once the whole schema is compiled.
    Asked,
    /// Strings without a maximum length: a repeated one can always be written on, so
    /// one is refused only at its closing quote.
    Strings,
    /// Values of `enum`s/`const`s, their texts sorted and distinct (an item is recorded by
    /// its place here, exactly): one already in the array does not start.
    Literals(Vec<Box<[u8]>>),
    /// Integers (Pydantic's `set[int]`), held to a range (the whole 15 digits when none is
    /// declared); an item is recorded by its value. A digit is taken only while the range
    /// holds more values that start with the text than the array already has.
    Integers(Range),
}

/// FNV-1a, one byte on: the hashes of keys and of unique items.
fn fnv(hash: u64, b: u8) -> u64 {
    (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A compiled JSON Schema.
#[derive(Debug, Clone)]
pub struct Grammar {
    nodes: Vec<Node>,
    /// The compiled `pattern`s.
    automata: Vec<Automaton>,
    root: NodeId,
    /// The nesting (objects and arrays) each node's smallest value needs; `u32::MAX` when
    /// no finite value matches. Values are only started where they can be finished.
    min_depth: Vec<u32>,
}

/// Keywords that only annotate, skipped without effect.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "discriminator",
    "strict",
    "name",
];

/// Keywords that constrain values in ways the matcher does not enforce: refused.
const UNSUPPORTED: &[&str] = &[
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "unevaluatedItems",
    "not",
    "if",
    "then",
    "else",
    "$dynamicRef",
    "$recursiveRef",
    "contentEncoding",
    "contentMediaType",
];

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    automata: Vec<Automaton>,
    pattern_time: std::time::Duration,
    /// `$ref` targets already compiled (or being compiled: recursion).
    refs: HashMap<String, NodeId>,
    any: Option<NodeId>,
    /// Schemas being compiled, one inside the other.
    depth: usize,
}

fn fail(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_string(),
        message: message.into(),
    }
}

fn json_text(value: &Value) -> Box<[u8]> {
    serde_json::to_vec(value)
        .unwrap_or_default()
        .into_boxed_slice()
}

fn bound(
    schema: &serde_json::Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<u32>, SchemaError> {
    match schema.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n.min(u64::from(u32::MAX)) as u32))
            .ok_or_else(|| fail(path, format!("`{key}` must be a whole number"))),
    }
}

impl Compiler<'_> {
    fn push(&mut self, node: Node, path: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(fail(
                path,
                format!("the schema is too large (more than {MAX_NODES} parts)"),
            ));
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    /// Any JSON value: one node, shared, recursive.
    fn any(&mut self, path: &str) -> Result<NodeId, SchemaError> {
        if let Some(id) = self.any {
            return Ok(id);
        }
        let id = self.push(Node::OneOf(Vec::new()), path)?;
        self.any = Some(id);
        let object = self.push(
            Node::Object {
                properties: Vec::new(),
                required: 0,
                additional: Some(id),
                min: 0,
                max: u32::MAX,
            },
            path,
        )?;
        let array = self.push(
            Node::Array {
                prefix: Vec::new(),
                items: Some(id),
                min: 0,
                max: u32::MAX,
                unique: Unique::No,
            },
            path,
        )?;
        let string = self.push(
            Node::String {
                min: 0,
                max: u32::MAX,
            },
            path,
        )?;
        let number = self.push(
            Node::Number {
                integer: false,
                range: None,
            },
            path,
        )?;
        let literals = self.push(
            Node::Literals(vec![
                Box::from(&b"true"[..]),
                Box::from(&b"false"[..]),
                Box::from(&b"null"[..]),
            ]),
            path,
        )?;
        self.nodes[id as usize] = Node::OneOf(vec![object, array, string, number, literals]);
        Ok(id)
    }

    fn compile(&mut self, schema: &Value, path: &str) -> Result<NodeId, SchemaError> {
        if self.depth >= MAX_SCHEMA_DEPTH {
            return Err(fail(
                path,
                format!("schemas nest more than {MAX_SCHEMA_DEPTH} deep (through `$ref` included)"),
            ));
        }
        self.depth += 1;
        let compiled = self.compile_nested(schema, path);
        self.depth -= 1;
        compiled
    }

    fn compile_nested(&mut self, schema: &Value, path: &str) -> Result<NodeId, SchemaError> {
        let object = match schema {
            Value::Bool(true) => return self.any(path),
            Value::Bool(false) => {
                return Err(fail(
                    path,
                    "`false` allows no value, so nothing could be generated",
                ))
            }
            Value::Object(o) => o,
            _ => return Err(fail(path, "a schema must be an object or a boolean")),
        };
        for key in object.keys() {
            if UNSUPPORTED.contains(&key.as_str()) {
                return Err(fail(
                    path,
                    format!(
                        "`{key}` is not supported by runner's constrained decoding, which enforces type, properties, required, additionalProperties, items, prefixItems, minItems, maxItems, uniqueItems (of strings, integers or enum values), propertyNames (an enum or const of names), minProperties, maxProperties, minLength, maxLength, pattern, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, enum, const, anyOf, oneOf, allOf (of one schema), local $ref and the formats date, time, date-time and uuid; remove `{key}`, or check it after generation"
                    ),
                ));
            }
        }
        let constraining = |except: &[&str]| {
            object
                .keys()
                .find(|k| !ANNOTATIONS.contains(&k.as_str()) && !except.contains(&k.as_str()))
                .cloned()
        };
        if let Some(reference) = object.get("$ref") {
            if let Some(other) = constraining(&["$ref"]) {
                return Err(fail(
                    path,
                    format!("`{other}` beside `$ref` is not supported; move it into the referenced schema"),
                ));
            }
            let reference = reference
                .as_str()
                .ok_or_else(|| fail(path, "`$ref` must be a string"))?;
            return self.reference(reference, path);
        }
        if let Some(all) = object.get("allOf") {
            match all.as_array().map(Vec::as_slice) {
                Some([one]) if constraining(&["allOf"]).is_none() => {
                    return self.compile(one, &format!("{path}/allOf/0"))
                }
                _ => {
                    return Err(fail(
                        path,
                        "`allOf` is supported only as a list of one schema with nothing beside it",
                    ))
                }
            }
        }
        for key in ["anyOf", "oneOf"] {
            let Some(list) = object.get(key) else {
                continue;
            };
            if let Some(other) = constraining(&[key]) {
                return Err(fail(
                    path,
                    format!(
                        "`{other}` beside `{key}` is not supported; move it into each alternative"
                    ),
                ));
            }
            let list = list.as_array().filter(|l| !l.is_empty()).ok_or_else(|| {
                fail(path, format!("`{key}` must be a non-empty list of schemas"))
            })?;
            let id = self.push(Node::OneOf(Vec::new()), path)?;
            // oneOf is followed as anyOf: the output matches at least one alternative (the
            // alternatives of generated schemas, e.g. tagged unions, exclude each other).
            let alternatives = list
                .iter()
                .enumerate()
                .map(|(i, s)| self.compile(s, &format!("{path}/{key}/{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            self.nodes[id as usize] = Node::OneOf(alternatives);
            return Ok(id);
        }
        if let Some(value) = object.get("const") {
            return self.push(Node::Literals(vec![json_text(value)]), path);
        }
        if let Some(values) = object.get("enum") {
            let values = values
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| fail(path, "`enum` must be a non-empty list"))?;
            return self.push(Node::Literals(values.iter().map(json_text).collect()), path);
        }
        if object.get("nullable") == Some(&Value::Bool(true)) {
            // OpenAPI 3.0's way of saying `anyOf: [this, null]`.
            let mut rest = object.clone();
            rest.remove("nullable");
            let id = self.push(Node::OneOf(Vec::new()), path)?;
            let this = self.compile(&Value::Object(rest), path)?;
            let null = self.push(Node::Literals(vec![Box::from(&b"null"[..])]), path)?;
            self.nodes[id as usize] = Node::OneOf(vec![this, null]);
            return Ok(id);
        }
        let types: Vec<&str> = match object.get("type") {
            None => {
                if object.contains_key("properties")
                    || object.contains_key("required")
                    || object.contains_key("additionalProperties")
                    || object.contains_key("propertyNames")
                {
                    vec!["object"]
                } else if object.contains_key("items")
                    || object.contains_key("prefixItems")
                    || object.contains_key("minItems")
                    || object.contains_key("maxItems")
                {
                    vec!["array"]
                } else if object.contains_key("minLength")
                    || object.contains_key("maxLength")
                    || object.contains_key("format")
                    || object.contains_key("pattern")
                {
                    vec!["string"]
                } else if [
                    "minimum",
                    "maximum",
                    "exclusiveMinimum",
                    "exclusiveMaximum",
                    "multipleOf",
                ]
                .iter()
                .any(|k| object.contains_key(*k))
                {
                    vec!["number"]
                } else {
                    return self.any(path);
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| t.as_str().ok_or_else(|| fail(path, "`type` lists strings")))
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(fail(
                    path,
                    "`type` must be a string or a non-empty list of them",
                ))
            }
        };
        if let [one] = types.as_slice() {
            return self.typed(object, one, path);
        }
        let id = self.push(Node::OneOf(Vec::new()), path)?;
        let alternatives = types
            .iter()
            .map(|t| self.typed(object, t, path))
            .collect::<Result<Vec<_>, _>>()?;
        self.nodes[id as usize] = Node::OneOf(alternatives);
        Ok(id)
    }

    fn typed(
        &mut self,
        schema: &serde_json::Map<String, Value>,
        ty: &str,
        path: &str,
    ) -> Result<NodeId, SchemaError> {
        match ty {
            "null" => self.push(Node::Literals(vec![Box::from(&b"null"[..])]), path),
            "boolean" => self.push(
                Node::Literals(vec![Box::from(&b"true"[..]), Box::from(&b"false"[..])]),
                path,
            ),
            "number" | "integer" => {
                let integer = ty == "integer";
                let range = Range::of(schema, integer, path)?;
                self.push(Node::Number { integer, range }, path)
            }
            "string" if schema.contains_key("format") => {
                let format = match schema["format"].as_str() {
                    Some("date") => Format::Date,
                    Some("time") => Format::Time,
                    Some("date-time") => Format::DateTime,
                    Some("uuid") => Format::Uuid,
                    other => {
                        return Err(fail(
                            path,
                            format!("`format: {}` is not supported by runner's constrained decoding (it enforces date, time, date-time and uuid); remove it, or check it after generation", other.map_or("(not a string)".to_string(), |f| format!("{f:?}"))),
                        ))
                    }
                };
                if schema.contains_key("minLength") || schema.contains_key("maxLength") {
                    return Err(fail(
                        path,
                        "`minLength`/`maxLength` beside `format` is not supported (the format fixes the length)",
                    ));
                }
                if schema.contains_key("pattern") {
                    return Err(fail(
                        path,
                        "`pattern` beside `format` is not supported; write the format into the pattern",
                    ));
                }
                self.push(Node::Formatted(format), path)
            }
            "string" => {
                let min = bound(schema, "minLength", path)?.unwrap_or(0);
                let max = bound(schema, "maxLength", path)?.unwrap_or(u32::MAX);
                if min > max {
                    return Err(fail(path, "`minLength` is above `maxLength`: no string matches"));
                }
                match schema.get("pattern") {
                    None => self.push(Node::String { min, max }, path),
                    Some(Value::String(_)) if self.automata.len() >= MAX_PATTERNS => Err(fail(
                        path,
                        format!("more than {MAX_PATTERNS} `pattern`s in one schema"),
                    )),
                    Some(Value::String(_)) if self.pattern_time > PATTERN_TIME => Err(fail(
                        path,
                        format!("this schema's `pattern`s took more than {PATTERN_TIME:?} to compile"),
                    )),
                    Some(Value::String(pattern)) => {
                        let started = std::time::Instant::now();
                        let automaton = Automaton::compile(pattern, min, max);
                        self.pattern_time += started.elapsed();
                        let automaton = automaton.map_err(|why| {
                            fail(path, format!("`pattern` {pattern:?}: {why}"))
                        })?;
                        self.automata.push(automaton);
                        self.push(Node::Pattern(self.automata.len() as u32 - 1), path)
                    }
                    Some(_) => Err(fail(path, "`pattern` must be a string")),
                }
            }
            "array" => self.array(schema, path),
            "object" => self.object(schema, path),
            other => Err(fail(
                path,
                format!("unknown type `{other}` (JSON Schema's types: null, boolean, number, integer, string, array, object)"),
            )),
        }
    }

    fn array(
        &mut self,
        schema: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<NodeId, SchemaError> {
        let min = bound(schema, "minItems", path)?.unwrap_or(0);
        let max = bound(schema, "maxItems", path)?.unwrap_or(u32::MAX);
        if min > max {
            return Err(fail(
                path,
                "`minItems` is above `maxItems`: no array matches",
            ));
        }
        let id = self.push(Node::OneOf(Vec::new()), path)?;
        let prefix = match schema.get("prefixItems") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, s)| self.compile(s, &format!("{path}/prefixItems/{i}")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(fail(path, "`prefixItems` must be a list of schemas")),
        };
        let items = match schema.get("items") {
            None | Some(Value::Bool(true)) => Some(self.any(path)?),
            Some(Value::Bool(false)) => None,
            Some(s @ Value::Object(_)) => Some(self.compile(s, &format!("{path}/items"))?),
            Some(Value::Array(_)) => {
                return Err(fail(
                    path,
                    "`items` as a list is draft-07's tuple form; use `prefixItems`",
                ))
            }
            Some(_) => return Err(fail(path, "`items` must be a schema")),
        };
        if items.is_none() && (min as usize) > prefix.len() {
            return Err(fail(
                path,
                "`minItems` asks for more items than `prefixItems` allows",
            ));
        }
        let unique = match schema.get("uniqueItems") {
            None | Some(Value::Bool(false)) => Unique::No,
            Some(Value::Bool(true)) if !prefix.is_empty() => {
                return Err(fail(
                    path,
                    "`uniqueItems` beside `prefixItems` is not supported",
                ))
            }
            Some(Value::Bool(true)) => Unique::Asked,
            Some(_) => return Err(fail(path, "`uniqueItems` must be true or false")),
        };
        self.nodes[id as usize] = Node::Array {
            prefix,
            items,
            min,
            max,
            unique,
        };
        Ok(id)
    }

    fn object(
        &mut self,
        schema: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<NodeId, SchemaError> {
        let id = self.push(Node::OneOf(Vec::new()), path)?;
        let mut properties: Vec<(String, NodeId)> = Vec::new();
        match schema.get("properties") {
            None => {}
            Some(Value::Object(props)) => {
                for (name, s) in props {
                    let pointer = format!(
                        "{path}/properties/{}",
                        name.replace('~', "~0").replace('/', "~1")
                    );
                    properties.push((name.clone(), self.compile(s, &pointer)?));
                }
            }
            Some(_) => return Err(fail(path, "`properties` must be an object of schemas")),
        }
        let mut additional = match schema.get("additionalProperties") {
            None | Some(Value::Bool(true)) => Some(self.any(path)?),
            Some(Value::Bool(false)) => None,
            Some(s @ Value::Object(_)) => {
                Some(self.compile(s, &format!("{path}/additionalProperties"))?)
            }
            Some(_) => {
                return Err(fail(
                    path,
                    "`additionalProperties` must be a schema or a boolean",
                ))
            }
        };
        // `propertyNames` as a list of names (Pydantic's `dict[Literal[…], T]` and
        // `dict[SomeEnum, T]`): each allowed name becomes a property with the other keys'
        // schema, and no other key is written.
        if let Some(names) = schema.get("propertyNames") {
            if let Some(allowed) = self.property_names(names, path)? {
                if let Some(name) = schema
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .find(|name| !allowed.iter().any(|a| a == name))
                {
                    return Err(fail(
                        path,
                        format!("`{name}` is required but `propertyNames` does not allow it: no object matches"),
                    ));
                }
                properties.retain(|(name, _)| allowed.contains(name));
                if let Some(others) = additional {
                    for name in allowed {
                        if !properties.iter().any(|(n, _)| *n == name) {
                            properties.push((name, others));
                        }
                    }
                }
                additional = None;
            }
        }
        let mut required = 0u64;
        if let Some(names) = schema.get("required") {
            let names = names
                .as_array()
                .ok_or_else(|| fail(path, "`required` must be a list of names"))?;
            for name in names {
                let name = name
                    .as_str()
                    .ok_or_else(|| fail(path, "`required` lists property names (strings)"))?;
                let index = match properties.iter().position(|(n, _)| n == name) {
                    Some(i) => i,
                    None => match additional {
                        // A required key without a schema of its own takes the other keys'.
                        Some(schema) => {
                            properties.push((name.to_string(), schema));
                            properties.len() - 1
                        }
                        None => {
                            return Err(fail(
                                path,
                                format!("`{name}` is required but not in `properties`, and `additionalProperties` is false: no object matches"),
                            ))
                        }
                    },
                };
                if index < 64 {
                    required |= 1 << index;
                }
            }
        }
        if properties.len() > MAX_PROPERTIES {
            return Err(fail(
                path,
                format!("{} properties; runner's constrained decoding takes at most {MAX_PROPERTIES} per object", properties.len()),
            ));
        }
        let properties: Vec<(Box<[u8]>, NodeId)> = properties
            .into_iter()
            .map(|(name, schema)| {
                // Between the quotes, as serde_json would write the name.
                let quoted = json_text(&Value::String(name));
                (Box::from(&quoted[1..quoted.len() - 1]), schema)
            })
            .collect();
        let min = bound(schema, "minProperties", path)?.unwrap_or(0);
        let max = bound(schema, "maxProperties", path)?.unwrap_or(u32::MAX);
        let impossible = if min > max {
            Some("`minProperties` is above `maxProperties`")
        } else if required.count_ones() > max {
            Some("more properties are required than `maxProperties` allows")
        } else if additional.is_none() && min as usize > properties.len() {
            Some("`minProperties` asks for more keys than `properties` has, and `additionalProperties` is false")
        } else {
            None
        };
        if let Some(why) = impossible {
            return Err(fail(path, format!("{why}: no object matches")));
        }
        self.nodes[id as usize] = Node::Object {
            properties,
            required,
            additional,
            min,
            max,
        };
        Ok(id)
    }

    /// The names a `propertyNames` schema allows: `None` for any (`true`, `{}`), else the
    /// strings of its `enum` or `const`, through local `$ref`s. Other name constraints
    /// (`pattern`, `maxLength`, …) are refused by name.
    fn property_names(
        &self,
        names: &Value,
        path: &str,
    ) -> Result<Option<Vec<String>>, SchemaError> {
        let path = format!("{path}/propertyNames");
        let mut names = names;
        for _ in 0..=MAX_DEPTH {
            let object = match names {
                Value::Bool(true) => return Ok(None),
                Value::Bool(false) => return Ok(Some(Vec::new())),
                Value::Object(object) => object,
                _ => return Err(fail(&path, "`propertyNames` must be a schema")),
            };
            if let Some(reference) = object.get("$ref") {
                let target = reference
                    .as_str()
                    .and_then(|r| r.strip_prefix('#'))
                    .and_then(|pointer| self.root.pointer(pointer));
                names = target.ok_or_else(|| {
                    fail(
                        &path,
                        format!(
                            "`$ref: {reference}` is not a local reference to a schema in this one"
                        ),
                    )
                })?;
                continue;
            }
            let refused = || {
                fail(
                    &path,
                    "`propertyNames` is enforced as an `enum` or `const` of names (Pydantic's `dict[Literal[…], …]`); remove its other constraints, or check them after generation",
                )
            };
            let constrains = object.keys().any(|k| {
                !matches!(
                    k.as_str(),
                    "enum" | "const" | "type" | "title" | "description" | "$comment"
                )
            });
            if constrains {
                return Err(refused());
            }
            let listed = match (object.get("enum"), object.get("const")) {
                (Some(Value::Array(values)), None) => values.as_slice(),
                (None, Some(value)) => std::slice::from_ref(value),
                // `{}` or `{"type": "string"}`: any name.
                (None, None) if object.get("type").is_none_or(|t| t == "string") => {
                    return Ok(None)
                }
                (None, None) => return Err(refused()),
                _ => return Err(fail(&path, "`enum` must be a list")),
            };
            // Names are strings: other values name no key.
            let mut allowed: Vec<String> = listed
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            allowed.sort();
            allowed.dedup();
            return Ok(Some(allowed));
        }
        Err(fail(&path, "`propertyNames` refers to itself"))
    }

    fn reference(&mut self, reference: &str, path: &str) -> Result<NodeId, SchemaError> {
        if let Some(&id) = self.refs.get(reference) {
            return Ok(id);
        }
        let Some(pointer) = reference.strip_prefix('#') else {
            return Err(fail(
                path,
                format!("`$ref: {reference}` points outside this schema; only local references (`#/$defs/…`) are supported"),
            ));
        };
        let target = self.root.pointer(pointer).ok_or_else(|| {
            fail(
                path,
                format!("`$ref: {reference}` points at nothing in this schema"),
            )
        })?;
        // Reserved before compiling, so a recursive reference finds it.
        let id = self.push(Node::OneOf(Vec::new()), path)?;
        self.refs.insert(reference.to_string(), id);
        let resolved = self.compile(target, reference)?;
        self.nodes[id as usize] = Node::OneOf(vec![resolved]);
        Ok(id)
    }
}

impl Grammar {
    /// Compiles a JSON Schema (draft 2020-12, or draft-07's spelling of the same).
    ///
    /// Enforced: `type` (one or a list), `properties`, `required`, `additionalProperties`
    /// (a boolean or a schema; absent means any other key is allowed, as JSON Schema says),
    /// `items`, `prefixItems`, `minItems`, `maxItems`, `minLength`, `maxLength`, `pattern`
    /// (see [`pattern`]), `minimum`, `maximum` and their exclusive forms (see [`bounds`]),
    /// `enum`, `const`, `anyOf`, `oneOf` (followed as `anyOf`), `allOf` of one schema, `nullable`,
    /// local `$ref` (recursion included), and the string formats of [`Format`]. Annotations
    /// (`title`, `description`, `default`…) and unknown keywords are skipped; the
    /// constraints in [`UNSUPPORTED`] are refused.
    pub fn compile(schema: &Value) -> Result<Self, SchemaError> {
        let mut compiler = Compiler {
            root: schema,
            nodes: Vec::new(),
            automata: Vec::new(),
            pattern_time: std::time::Duration::ZERO,
            refs: HashMap::new(),
            any: None,
            depth: 0,
        };
        let root = compiler.compile(schema, "#")?;
        let mut grammar = Grammar {
            nodes: compiler.nodes,
            automata: compiler.automata,
            root,
            min_depth: Vec::new(),
        };
        grammar.check_alternatives()?;
        grammar.resolve_unique()?;
        grammar.min_depth = grammar.min_depths();
        match grammar.min_depth[root as usize] {
            u32::MAX => Err(fail(
                "#",
                "no finite JSON value matches this schema (a required property or item that requires itself, e.g. a node that must have a child node)",
            )),
            depth if depth as usize > MAX_DEPTH => Err(fail(
                "#",
                format!("the smallest matching value nests {depth} objects or arrays deep; runner's limit is {MAX_DEPTH}"),
            )),
            _ => Ok(grammar),
        }
    }

    /// What each `uniqueItems` array holds: strings without a maximum length, integers
    /// (counted against their range, so none is a dead end), or values of `enum`s/`const`s;
    /// anything else is refused (a repeated item there could be a dead end: a fraction at
    /// its last digit, a string at its `maxLength`).
    fn resolve_unique(&mut self) -> Result<(), SchemaError> {
        for i in 0..self.nodes.len() {
            let Node::Array {
                items: Some(items),
                min,
                unique: Unique::Asked,
                ..
            } = &self.nodes[i]
            else {
                continue;
            };
            let (items, min) = (*items, *min);
            // The values an item may start as (alternatives are followed, as `start` does;
            // `check_alternatives` has bounded them).
            let (mut literals, mut strings, mut other) = (Vec::new(), 0u32, 0u32);
            let mut integers = Vec::new();
            let mut stack = vec![items];
            let mut seen = Vec::new();
            while let Some(id) = stack.pop() {
                if seen.contains(&id) {
                    continue;
                }
                seen.push(id);
                match &self.nodes[id as usize] {
                    Node::OneOf(alternatives) => stack.extend(alternatives),
                    Node::Literals(texts) => literals.extend(texts.iter().cloned()),
                    Node::String { max: u32::MAX, .. } => strings += 1,
                    Node::Number { integer: true, .. } => integers.push(id),
                    _ => other += 1,
                }
            }
            if let ([integer], true, 0, 0) =
                (integers.as_slice(), literals.is_empty(), strings, other)
            {
                let integer = *integer;
                let Node::Number { range, .. } = &mut self.nodes[integer as usize] else {
                    continue;
                };
                // Written through the bounded path, so every digit can be checked.
                let range = *range.get_or_insert_with(Range::whole_integers);
                if i128::from(min) > range.count() {
                    return Err(fail(
                        "#",
                        format!("`minItems` {min} asks for more unique items than the {} integers an item may be", range.count()),
                    ));
                }
                if let Node::Array { unique: u, .. } = &mut self.nodes[i] {
                    *u = Unique::Integers(range);
                }
                continue;
            }
            let other = other + integers.len() as u32;
            // Distinct values: an `enum` listing one twice offers it once.
            literals.sort();
            literals.dedup();
            let unique = match (literals.len() as u32, strings, other) {
                (0, 1.., 0) => Unique::Strings,
                (n @ 1.., 0, 0) if min <= n => Unique::Literals(literals),
                (n @ 1.., 0, 0) => {
                    return Err(fail(
                        "#",
                        format!("`minItems` {min} asks for more unique items than the {n} values an item may be"),
                    ))
                }
                _ => {
                    return Err(fail(
                        "#",
                        "`uniqueItems` is enforced for arrays of strings (without `maxLength`, `pattern` or `format`), of integers, or of `enum`/`const` values; remove it, or check it after generation",
                    ))
                }
            };
            if let Node::Array { unique: u, .. } = &mut self.nodes[i] {
                *u = unique;
            }
        }
        Ok(())
    }

    /// Refuses references that loop without any JSON in between (`{"$ref": "#"}`), and
    /// schemas whose alternatives multiply past [`MAX_ALTERNATIVES`].
    fn check_alternatives(&self) -> Result<(), SchemaError> {
        // 0: not seen; 1: on the path; 2: done. `counts`: values a node may start as.
        let mut state = vec![0u8; self.nodes.len()];
        let mut counts = vec![0u64; self.nodes.len()];
        // `depth`: the alternatives being visited, one inside the other. A value's start
        // recurses as deep (Grammar::start), so it is bounded here.
        fn visit(
            g: &Grammar,
            id: NodeId,
            state: &mut [u8],
            counts: &mut [u64],
            heights: &mut [usize],
            depth: usize,
        ) -> Result<u64, SchemaError> {
            let i = id as usize;
            match state[i] {
                2 => return Ok(counts[i]),
                1 => {
                    return Err(fail(
                        "#",
                        "a `$ref` or `anyOf` refers back to itself without any JSON in between (e.g. `{\"$ref\": \"#\"}`): no value could ever start",
                    ))
                }
                _ => {}
            }
            let too_deep = |height: usize| {
                (height > MAX_CHAIN).then(|| fail(
                    "#",
                    format!("`$ref`s and `anyOf`s lead to other `$ref`s and `anyOf`s more than {MAX_CHAIN} deep before any value"),
                ))
            };
            if let Some(e) = too_deep(depth) {
                return Err(e);
            }
            state[i] = 1;
            let count = match &g.nodes[i] {
                Node::OneOf(alternatives) => {
                    let mut total = 0u64;
                    for &a in alternatives {
                        total =
                            total.saturating_add(visit(g, a, state, counts, heights, depth + 1)?);
                        // Memoised chains count whole, wherever they were first visited from.
                        heights[i] = heights[i].max(heights[a as usize] + 1);
                    }
                    if let Some(e) = too_deep(heights[i]) {
                        return Err(e);
                    }
                    total
                }
                Node::Literals(texts) => texts.len() as u64,
                _ => 1,
            };
            if count > MAX_ALTERNATIVES {
                return Err(fail(
                    "#",
                    format!("a value could start as {count} alternatives (anyOf/enum combined); runner's limit is {MAX_ALTERNATIVES}"),
                ));
            }
            state[i] = 2;
            counts[i] = count;
            Ok(count)
        }
        let mut heights = vec![0usize; self.nodes.len()];
        for i in 0..self.nodes.len() {
            visit(self, i as NodeId, &mut state, &mut counts, &mut heights, 0)?;
        }
        Ok(())
    }

    /// Each node's [`Grammar::min_depth`], to a fixed point (recursion converges from
    /// "no finite value" down).
    fn min_depths(&self) -> Vec<u32> {
        let mut depth = vec![u32::MAX; self.nodes.len()];
        let deepest = |depth: &[u32], ids: &mut dyn Iterator<Item = NodeId>| {
            ids.map(|id| depth[id as usize]).max().unwrap_or(0)
        };
        loop {
            let mut changed = false;
            for (i, node) in self.nodes.iter().enumerate() {
                let d = match node {
                    Node::Literals(_)
                    | Node::Number { .. }
                    | Node::String { .. }
                    | Node::Pattern(_)
                    | Node::Formatted(_) => 0,
                    Node::OneOf(alternatives) => alternatives
                        .iter()
                        .map(|&a| depth[a as usize])
                        .min()
                        .unwrap_or(u32::MAX),
                    Node::Array {
                        prefix, items, min, ..
                    } => {
                        let mut required = (0..*min as usize)
                            .map(|k| prefix.get(k).copied().or(*items).unwrap_or(NodeId::MAX))
                            .take(prefix.len() + 1);
                        match deepest(
                            &depth,
                            &mut required.by_ref().filter(|&id| id != NodeId::MAX),
                        ) {
                            u32::MAX => u32::MAX,
                            d => d + 1,
                        }
                    }
                    Node::Object {
                        properties,
                        required,
                        additional,
                        min,
                        ..
                    } => {
                        let mut needed = properties
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| required & (1 << k) != 0)
                            .map(|(_, (_, id))| *id);
                        let required_depth = deepest(&depth, &mut needed);
                        // `minProperties` beyond the required keys: the shallowest others
                        // (other keys' schema as often as needed).
                        let more = (*min).saturating_sub(required.count_ones()) as usize;
                        let mut optional: Vec<u32> = properties
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| required & (1 << k) == 0)
                            .map(|(_, (_, id))| depth[*id as usize])
                            .collect();
                        if let Some(a) = additional {
                            optional.extend(std::iter::repeat_n(depth[*a as usize], more));
                        }
                        optional.sort_unstable();
                        let more_depth = match more {
                            0 => 0,
                            n => optional.get(n - 1).copied().unwrap_or(u32::MAX),
                        };
                        match required_depth.max(more_depth) {
                            u32::MAX => u32::MAX,
                            d => d + 1,
                        }
                    }
                };
                if d < depth[i] {
                    depth[i] = d;
                    changed = true;
                }
            }
            if !changed {
                return depth;
            }
        }
    }

    /// Whether a value of `node` can start, and be finished, with `depth` objects and
    /// arrays open around it.
    fn fits(&self, node: NodeId, depth: usize) -> bool {
        let needed = self.min_depth[node as usize];
        needed != u32::MAX && depth + needed as usize <= MAX_DEPTH
    }

    /// A matcher at the start of the output.
    pub fn matcher(&self) -> Matcher {
        Matcher {
            alternatives: vec![Alternative {
                frames: vec![Frame::Value(self.root)],
                whitespace: 0,
                other_keys: Vec::new(),
                unique_items: Vec::new(),
            }],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Text {
    chars: u32,
    /// 0: none; 1: after `\`; 2–5: expecting the `\u` escape's hex digit 1–4.
    escape: u8,
    /// The first hex digit was `d`: the second must not start a surrogate.
    escape_d: bool,
    /// UTF-8 continuation bytes still expected, and the next one's range.
    pending: u8,
    low: u8,
    high: u8,
}

/// A string's byte that starts a character: the continuation bytes it needs, and the range
/// of the first (UTF-8 without overlong forms or surrogates); `None` for a control
/// character or a byte no character starts with.
fn utf8_lead(b: u8) -> Option<(u8, u8, u8)> {
    Some(match b {
        0x00..=0x1F => return None,
        0x20..=0x7F => (0, 0x80, 0xBF),
        0xC2..=0xDF => (1, 0x80, 0xBF),
        0xE0 => (2, 0xA0, 0xBF),
        0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
        0xED => (2, 0x80, 0x9F),
        0xF0 => (3, 0x90, 0xBF),
        0xF1..=0xF3 => (3, 0x80, 0xBF),
        0xF4 => (3, 0x80, 0x8F),
        _ => return None,
    })
}

enum TextStep {
    Took,
    Closed,
    Refused,
}

impl Text {
    const fn new() -> Self {
        Text {
            chars: 0,
            escape: 0,
            escape_d: false,
            pending: 0,
            low: 0x80,
            high: 0xBF,
        }
    }

    /// One byte of a JSON string's body (after its opening quote), held to `min..=max`
    /// characters. Only valid UTF-8 and valid escapes pass, and no `\u` escape of a lone
    /// surrogate, which strict parsers refuse.
    fn step(&mut self, b: u8, min: u32, max: u32) -> TextStep {
        if self.pending > 0 {
            if !(self.low..=self.high).contains(&b) {
                return TextStep::Refused;
            }
            self.pending -= 1;
            (self.low, self.high) = (0x80, 0xBF);
            return TextStep::Took;
        }
        match self.escape {
            0 => {}
            1 => {
                return match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        self.escape = 0;
                        TextStep::Took
                    }
                    b'u' => {
                        self.escape = 2;
                        TextStep::Took
                    }
                    _ => TextStep::Refused,
                }
            }
            digit => {
                if !b.is_ascii_hexdigit() {
                    return TextStep::Refused;
                }
                if digit == 2 {
                    self.escape_d = b.eq_ignore_ascii_case(&b'd');
                } else if digit == 3
                    && self.escape_d
                    && matches!(b.to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f')
                {
                    return TextStep::Refused;
                }
                self.escape = if digit == 5 { 0 } else { digit + 1 };
                return TextStep::Took;
            }
        }
        if b == b'"' {
            return if self.chars >= min {
                TextStep::Closed
            } else {
                TextStep::Refused
            };
        }
        if self.chars >= max {
            return TextStep::Refused;
        }
        if b == b'\\' {
            self.escape = 1;
        }
        let Some((pending, low, high)) = utf8_lead(b) else {
            return TextStep::Refused;
        };
        self.chars += 1;
        (self.pending, self.low, self.high) = (pending, low, high);
        TextStep::Took
    }
}

/// The string formats the matcher enforces (RFC 3339's, as JSON Schema defines them, and
/// RFC 4122's UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2024-02-29`: real month lengths, leap years included.
    Date,
    /// `23:59:30`, an optional fraction, then `Z` or an offset (`+01:00`).
    Time,
    /// A date, `T`, a time.
    DateTime,
    /// `123e4567-e89b-12d3-a456-426614174000`, hex digits in either case.
    Uuid,
}

/// How far a formatted string has come: its position in the format, and what later
/// positions depend on (the year and month bound the day; a first digit bounds the second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FormatState {
    at: u8,
    year: u16,
    month: u8,
    previous: u8,
    fraction: u8,
}

/// A time's end: past its offset, or its `Z`.
const TIME_DONE: u8 = u8::MAX;
/// Digits a time's fraction of a second may have.
const MAX_FRACTION: u8 = 9;

fn days_in(month: u8, year: u16) -> u8 {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl FormatState {
    fn step(mut self, format: Format, b: u8) -> Option<Self> {
        match format {
            Format::Uuid => {
                let ok = match self.at {
                    8 | 13 | 18 | 23 => b == b'-',
                    0..=35 => b.is_ascii_hexdigit(),
                    _ => false,
                };
                ok.then(|| {
                    self.at += 1;
                    self
                })
            }
            Format::Date => self.date(b),
            Format::Time => self.time(b, 0),
            Format::DateTime => match self.at {
                0..=9 => self.date(b),
                10 if b == b'T' => {
                    self.at = 11;
                    Some(self)
                }
                10 => None,
                _ => self.time(b, 11),
            },
        }
    }

    fn complete(self, format: Format) -> bool {
        match format {
            Format::Uuid => self.at == 36,
            Format::Date => self.at == 10,
            Format::Time | Format::DateTime => self.at == TIME_DONE,
        }
    }

    /// `YYYY-MM-DD`, at positions 0 to 9.
    fn date(mut self, b: u8) -> Option<Self> {
        let digit = b.is_ascii_digit().then(|| b - b'0');
        match self.at {
            0..=3 => self.year = self.year * 10 + u16::from(digit?),
            4 | 7 if b == b'-' => {}
            5 => self.previous = digit.filter(|&d| d <= 1)?,
            6 => {
                self.month = Some(self.previous * 10 + digit?).filter(|m| (1..=12).contains(m))?;
            }
            8 => {
                self.previous = digit.filter(|&d| d <= days_in(self.month, self.year) / 10)?;
            }
            9 => {
                let day = self.previous * 10 + digit?;
                if !(1..=days_in(self.month, self.year)).contains(&day) {
                    return None;
                }
            }
            _ => return None,
        }
        self.at += 1;
        Some(self)
    }

    /// `HH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`, from position `base`.
    fn time(mut self, b: u8, base: u8) -> Option<Self> {
        if self.at == TIME_DONE {
            return None;
        }
        let digit = b.is_ascii_digit().then(|| b - b'0');
        let end_of_seconds = |mut state: Self| match b {
            b'Z' => {
                state.at = TIME_DONE;
                Some(state)
            }
            b'+' | b'-' => {
                state.at = base + 20;
                Some(state)
            }
            _ => None,
        };
        match self.at - base {
            // Hours of the time, then of the offset.
            0 | 20 => self.previous = digit.filter(|&d| d <= 2)?,
            1 | 21 => {
                if self.previous * 10 + digit? > 23 {
                    return None;
                }
            }
            2 | 5 | 22 if b == b':' => {}
            3 | 6 | 23 => {
                digit.filter(|&d| d <= 5)?;
            }
            4 | 7 => {
                digit?;
            }
            24 => {
                digit?;
                self.at = TIME_DONE;
                return Some(self);
            }
            8 if b == b'.' => {
                self.fraction = 0;
                self.at = base + 9;
                return Some(self);
            }
            8 => return end_of_seconds(self),
            9 => {
                return match digit {
                    Some(_) if self.fraction < MAX_FRACTION => {
                        self.fraction += 1;
                        Some(self)
                    }
                    None if self.fraction > 0 => end_of_seconds(self),
                    _ => None,
                }
            }
            _ => return None,
        }
        self.at += 1;
        Some(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberPart {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Fraction(u8),
    E,
    ExponentSign,
    Exponent(u8),
}

impl NumberPart {
    fn complete(self) -> bool {
        matches!(
            self,
            Self::Zero | Self::Int(_) | Self::Fraction(_) | Self::Exponent(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    Open,
    AfterItem,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectState {
    Open,
    /// After a key: the property's index, or `u8::MAX` for another key.
    Colon(u8),
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A value of this node starts here (after optional whitespace).
    Value(NodeId),
    Literal {
        node: NodeId,
        index: u32,
        at: u32,
    },
    Number {
        integer: bool,
        part: NumberPart,
    },
    String {
        min: u32,
        max: u32,
        text: Text,
        /// FNV-1a of the decoded text (escapes as the characters they stand for), for
        /// `uniqueItems`; and a `\u` escape's code point so far.
        value: u64,
        code: u16,
    },
    /// A number held to its node's bounds.
    Bounded {
        node: NodeId,
        text: Decimal,
    },
    Pattern {
        automaton: u32,
        text: PatternText,
    },
    Formatted {
        format: Format,
        state: FormatState,
    },
    /// An object's key: the properties it may still become, and how much is matched.
    Key {
        node: NodeId,
        candidates: u64,
        at: u32,
        text: Text,
        /// FNV-1a of the key's bytes, to refuse another key written twice.
        hash: u64,
        /// Any name may be written (other keys are allowed): a string, followed for the
        /// properties it may still name.
        free: bool,
    },
    Array {
        node: NodeId,
        count: u32,
        state: ArrayState,
    },
    Object {
        node: NodeId,
        seen: u64,
        state: ObjectState,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Alternative {
    frames: Vec<Frame>,
    /// The whitespace since the last token: 0 none, 1 a space, 2 + n a newline and n
    /// spaces or tabs.
    whitespace: u8,
    /// Keys other than the declared properties, by the depth of their object and their
    /// hash: a small model otherwise writes one key again and again.
    other_keys: Vec<(usize, u64)>,
    /// The items of open `uniqueItems` arrays, by the depth of their array and their hash.
    unique_items: Vec<(usize, u64)>,
}

/// Where the output stands: every way the bytes so far can still become a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    alternatives: Vec<Alternative>,
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The whitespace state after `b`, if the run may go on with it (see [`MAX_INDENT`]).
fn more_whitespace(state: u8, b: u8) -> Option<u8> {
    match (state, b) {
        (0, b' ') => Some(1),
        (0, b'\n') => Some(2),
        (2.., b' ' | b'\t') if state - 2 < MAX_INDENT => Some(state + 1),
        _ => None,
    }
}

impl Grammar {
    fn literal(&self, node: NodeId, index: u32) -> &[u8] {
        match &self.nodes[node as usize] {
            Node::Literals(texts) => &texts[index as usize],
            _ => &[],
        }
    }

    /// The schema of an array's item `index`, if it may have one that fits at `depth`.
    fn item(&self, node: NodeId, index: u32, depth: usize) -> Option<NodeId> {
        match &self.nodes[node as usize] {
            Node::Array {
                prefix, items, max, ..
            } if index < *max => prefix
                .get(index as usize)
                .copied()
                .or(*items)
                .filter(|&item| self.fits(item, depth)),
            _ => None,
        }
    }

    /// The properties an object's next key may name (unseen ones whose values fit at
    /// `depth`), and the schema of other keys' values, if they are allowed and fit.
    fn next_keys(&self, node: NodeId, seen: u64, depth: usize) -> (u64, Option<NodeId>) {
        match &self.nodes[node as usize] {
            Node::Object {
                properties,
                additional,
                ..
            } => {
                let mut candidates = 0u64;
                for (i, (_, schema)) in properties.iter().enumerate() {
                    if seen & (1 << i) == 0 && self.fits(*schema, depth) {
                        candidates |= 1 << i;
                    }
                }
                (candidates, additional.filter(|&a| self.fits(a, depth)))
            }
            _ => (0, None),
        }
    }

    /// Whether an object may take another key, having seen `seen`.
    fn more_keys(&self, node: NodeId, seen: u64, depth: usize) -> bool {
        let (candidates, other) = self.next_keys(node, seen, depth);
        candidates != 0 || other.is_some()
    }

    /// The depth and kind of the `uniqueItems` array whose item starts or ends here (the
    /// top frame), if it is one.
    fn unique_array(&self, alt: &Alternative) -> Option<(usize, &Unique)> {
        match alt.frames.last() {
            Some(Frame::Array { node, .. }) => match &self.nodes[*node as usize] {
                Node::Array {
                    unique: unique @ (Unique::Strings | Unique::Literals(_) | Unique::Integers(_)),
                    ..
                } => Some((alt.frames.len(), unique)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The `uniqueItems` array of integers (its depth and range) whose item is the number
    /// on top, if it is one.
    fn unique_integers(&self, alt: &Alternative) -> Option<(usize, Range)> {
        let under = alt.frames.len().checked_sub(2)?;
        match alt.frames[under] {
            Frame::Array { node, .. } => match &self.nodes[node as usize] {
                Node::Array {
                    unique: Unique::Integers(range),
                    ..
                } => Some((under + 1, *range)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether an integer item that starts with `text` can still be one its array (at
    /// `depth`) does not hold yet: the range has more values that start so than the array
    /// has items that do.
    fn integer_room(alt: &Alternative, depth: usize, range: &Range, text: &Decimal) -> bool {
        let taken = alt
            .unique_items
            .iter()
            .filter(|&&(d, v)| d == depth && text.leads_to(v as i64))
            .count();
        range.count_from(text) > taken as i128
    }

    /// Whether a `uniqueItems` array of values has one left to add (others always may).
    fn another_unique(&self, node: NodeId, items: &[(usize, u64)], depth: usize) -> bool {
        match &self.nodes[node as usize] {
            Node::Array {
                unique: Unique::Literals(values),
                ..
            } => items.iter().filter(|&&(d, _)| d == depth).count() < values.len(),
            Node::Array {
                unique: Unique::Integers(range),
                ..
            } => (items.iter().filter(|&&(d, _)| d == depth).count() as i128) < range.count(),
            _ => true,
        }
    }

    /// Whether an object may close, having seen `seen` and `others` other keys.
    fn may_close(&self, node: NodeId, seen: u64, others: usize) -> bool {
        match &self.nodes[node as usize] {
            Node::Object { required, min, .. } => {
                required & !seen == 0 && seen.count_ones() as usize + others >= *min as usize
            }
            _ => false,
        }
    }

    /// Whether an object's keys may number one more.
    fn below_max(&self, node: NodeId, seen: u64, others: usize) -> bool {
        match &self.nodes[node as usize] {
            Node::Object { max, .. } => (seen.count_ones() as usize + others) < *max as usize,
            _ => false,
        }
    }

    /// A value of `node` starting with byte `b` (not whitespace), on top of `alt`.
    fn start(&self, mut alt: Alternative, node: NodeId, b: u8, out: &mut Vec<Alternative>) {
        if !self.fits(node, alt.frames.len()) {
            return;
        }
        match &self.nodes[node as usize] {
            Node::OneOf(alternatives) => {
                for &a in alternatives {
                    self.start(alt.clone(), a, b, out);
                }
                return;
            }
            Node::Literals(texts) => {
                let unique = self.unique_array(&alt);
                for (index, text) in texts.iter().enumerate() {
                    // In a `uniqueItems` array: the value's place among the array's values.
                    let recorded = match unique {
                        Some((depth, Unique::Literals(values))) => {
                            let place = values.binary_search(text).unwrap_or(usize::MAX);
                            Some((depth, place as u64))
                        }
                        _ => None,
                    };
                    if recorded.is_some_and(|r| alt.unique_items.contains(&r)) {
                        continue; // already in the array
                    }
                    if text.first() == Some(&b) {
                        let mut a = alt.clone();
                        if let Some(r) = recorded {
                            a.unique_items.push(r);
                        }
                        if text.len() > 1 {
                            a.frames.push(Frame::Literal {
                                node,
                                index: index as u32,
                                at: 1,
                            });
                        }
                        a.whitespace = 0;
                        out.push(a);
                    }
                }
                return;
            }
            Node::Number {
                range: Some(range), ..
            } => {
                let Some(text) = Decimal::start(range, b) else {
                    return;
                };
                if let Some((depth, Unique::Integers(range))) = self.unique_array(&alt) {
                    if !Self::integer_room(&alt, depth, range, &text) {
                        return;
                    }
                }
                alt.frames.push(Frame::Bounded { node, text });
            }
            &Node::Number {
                integer,
                range: None,
            } => {
                let part = match b {
                    b'-' => NumberPart::Minus,
                    b'0' => NumberPart::Zero,
                    b'1'..=b'9' => NumberPart::Int(1),
                    _ => return,
                };
                alt.frames.push(Frame::Number { integer, part });
            }
            &Node::String { min, max } if b == b'"' => {
                alt.frames.push(Frame::String {
                    min,
                    max,
                    text: Text::new(),
                    value: FNV_START,
                    code: 0,
                });
            }
            &Node::Pattern(automaton) if b == b'"' => {
                alt.frames.push(Frame::Pattern {
                    automaton,
                    text: self.automata[automaton as usize].text(),
                });
            }
            &Node::Formatted(format) if b == b'"' => {
                alt.frames.push(Frame::Formatted {
                    format,
                    state: FormatState::default(),
                });
            }
            Node::Array { .. } if b == b'[' => {
                alt.frames.push(Frame::Array {
                    node,
                    count: 0,
                    state: ArrayState::Open,
                });
            }
            Node::Object { .. } if b == b'{' => {
                alt.frames.push(Frame::Object {
                    node,
                    seen: 0,
                    state: ObjectState::Open,
                });
            }
            _ => return,
        }
        alt.whitespace = 0;
        out.push(alt);
    }

    /// Advances one alternative by byte `b`, into `out` (none, one, or several).
    fn step(&self, mut alt: Alternative, b: u8, out: &mut Vec<Alternative>) {
        let whitespace = is_whitespace(b);
        // Structural whitespace: between tokens, where the top frame allows it.
        let take_whitespace = |mut alt: Alternative, out: &mut Vec<Alternative>| {
            if let Some(next) = more_whitespace(alt.whitespace, b) {
                alt.whitespace = next;
                out.push(alt);
            }
        };
        loop {
            // Objects and arrays open (and the key or value being matched, if any).
            let depth = alt.frames.len();
            let Some(top) = alt.frames.last_mut() else {
                return; // the value is complete: nothing may follow
            };
            match top {
                &mut Frame::Value(node) => {
                    // After an object's `:` one space; nothing before the whole value (the
                    // output starts with it). Array items' whitespace is the array's.
                    if whitespace {
                        if b == b' ' && alt.whitespace == 0 && alt.frames.len() > 1 {
                            alt.whitespace = 1;
                            out.push(alt);
                        }
                        return;
                    }
                    alt.frames.pop();
                    return self.start(alt, node, b, out);
                }
                Frame::Literal { node, index, at } => {
                    let text = self.literal(*node, *index);
                    if text.get(*at as usize) != Some(&b) {
                        return;
                    }
                    *at += 1;
                    if *at as usize == text.len() {
                        alt.frames.pop();
                    }
                    break;
                }
                Frame::Number { integer, part } => {
                    let fraction_ok = !*integer;
                    let next = match (*part, b) {
                        (NumberPart::Minus, b'0') => NumberPart::Zero,
                        (NumberPart::Minus, b'1'..=b'9') => NumberPart::Int(1),
                        (NumberPart::Int(n), b'0'..=b'9') if n < MAX_DIGITS => {
                            NumberPart::Int(n + 1)
                        }
                        (NumberPart::Zero | NumberPart::Int(_), b'.') if fraction_ok => {
                            NumberPart::Dot
                        }
                        (
                            NumberPart::Zero | NumberPart::Int(_) | NumberPart::Fraction(_),
                            b'e' | b'E',
                        ) if fraction_ok => NumberPart::E,
                        (NumberPart::Dot, b'0'..=b'9') => NumberPart::Fraction(1),
                        (NumberPart::Fraction(n), b'0'..=b'9') if n < MAX_DIGITS => {
                            NumberPart::Fraction(n + 1)
                        }
                        (NumberPart::E, b'+' | b'-') => NumberPart::ExponentSign,
                        (NumberPart::E | NumberPart::ExponentSign, b'0'..=b'9') => {
                            NumberPart::Exponent(1)
                        }
                        (NumberPart::Exponent(n), b'0'..=b'9') if n < MAX_EXPONENT_DIGITS => {
                            NumberPart::Exponent(n + 1)
                        }
                        (done, _) if done.complete() => {
                            // The number ended before this byte: its container takes it.
                            alt.frames.pop();
                            continue;
                        }
                        _ => return,
                    };
                    *part = next;
                    break;
                }
                Frame::Formatted { format, state } => {
                    if b == b'"' {
                        if !state.complete(*format) {
                            return;
                        }
                        alt.frames.pop();
                    } else {
                        *state = match state.step(*format, b) {
                            Some(next) => next,
                            None => return,
                        };
                    }
                    break;
                }
                Frame::Bounded { node, text } => {
                    let Node::Number {
                        range: Some(range), ..
                    } = &self.nodes[*node as usize]
                    else {
                        return;
                    };
                    let (range, before) = (*range, *text);
                    match before.step(&range, b) {
                        Some(next) => {
                            *text = next;
                            if let Some((depth, integers)) = self.unique_integers(&alt) {
                                if !Self::integer_room(&alt, depth, &integers, &next) {
                                    return;
                                }
                            }
                        }
                        None if before.complete => {
                            // The number ended before this byte: its container takes it,
                            // unless it is an integer its `uniqueItems` array already holds.
                            if let Some((depth, _)) = self.unique_integers(&alt) {
                                let value = before.integer().unwrap_or_default() as u64;
                                if alt.unique_items.contains(&(depth, value)) {
                                    return;
                                }
                                alt.unique_items.push((depth, value));
                            }
                            alt.frames.pop();
                            continue;
                        }
                        None => return,
                    }
                    break;
                }
                Frame::Pattern { automaton, text } => {
                    match self.automata[*automaton as usize].text_step(text, b) {
                        TextStep::Took => break,
                        TextStep::Closed => {
                            alt.frames.pop();
                            break;
                        }
                        TextStep::Refused => return,
                    }
                }
                Frame::String {
                    min,
                    max,
                    text,
                    value,
                    code,
                } => {
                    let escape = text.escape;
                    match text.step(b, *min, *max) {
                        TextStep::Took => {
                            match escape {
                                0 if b == b'\\' => {}
                                0 => *value = fnv(*value, b),
                                1 if b == b'u' => *code = 0,
                                1 => {
                                    let decoded = pattern::ESCAPES
                                        .iter()
                                        .find(|&&(e, _)| e == b)
                                        .map_or(b, |&(_, d)| d);
                                    *value = fnv(*value, decoded);
                                }
                                digit => {
                                    let hex = (b as char).to_digit(16).unwrap_or(0) as u16;
                                    *code = (*code << 4) | hex;
                                    if digit == 5 {
                                        let c = char::from_u32(u32::from(*code)).unwrap_or('\0');
                                        for &byte in c.encode_utf8(&mut [0; 4]).as_bytes() {
                                            *value = fnv(*value, byte);
                                        }
                                    }
                                }
                            }
                            break;
                        }
                        TextStep::Closed => {
                            let value = *value;
                            alt.frames.pop();
                            if let Some((depth, _)) = self.unique_array(&alt) {
                                if alt.unique_items.contains(&(depth, value)) {
                                    return; // the same string again: it must go on
                                }
                                alt.unique_items.push((depth, value));
                            }
                            break;
                        }
                        TextStep::Refused => return,
                    }
                }
                Frame::Key {
                    node,
                    candidates,
                    at,
                    text,
                    hash,
                    free,
                } => {
                    let Node::Object { properties, .. } = &self.nodes[*node as usize] else {
                        return;
                    };
                    let closing = text.escape == 0 && text.pending == 0 && b == b'"';
                    if closing {
                        let exact = (0..properties.len()).find(|&i| {
                            *candidates & (1 << i) != 0 && properties[i].0.len() == *at as usize
                        });
                        let target = match (exact, *free) {
                            // A property's name: its schema, if its value still fits here.
                            (Some(i), _) if self.fits(properties[i].1, depth - 1) => i as u8,
                            (Some(_), _) => return,
                            (None, true) => u8::MAX,
                            (None, false) => return,
                        };
                        let hash = *hash;
                        alt.frames.pop();
                        let depth = alt.frames.len();
                        let Some(Frame::Object { seen, state, .. }) = alt.frames.last_mut() else {
                            return;
                        };
                        if target == u8::MAX {
                            if alt.other_keys.contains(&(depth, hash)) {
                                return; // a key written twice
                            }
                            alt.other_keys.push((depth, hash));
                        } else {
                            if *seen & (1 << target) != 0 {
                                return; // a key written twice
                            }
                            *seen |= 1 << target;
                        }
                        *state = ObjectState::Colon(target);
                        break;
                    }
                    if *free {
                        // Any key: a JSON string, followed for the names it may still be.
                        if !matches!(text.step(b, 0, u32::MAX), TextStep::Took) {
                            return;
                        }
                    } else if b == b'"' && text.escape == 0 {
                        return;
                    }
                    *hash = fnv(*hash, b);
                    let position = *at as usize;
                    for (i, (name, _)) in properties.iter().enumerate() {
                        if name.get(position) != Some(&b) {
                            *candidates &= !(1 << i);
                        }
                    }
                    if !*free {
                        // Names are matched as written (escapes included, byte for byte).
                        if *candidates == 0 {
                            return;
                        }
                        text.escape = u8::from(b == b'\\' && text.escape == 0);
                    }
                    *at += 1;
                    break;
                }
                Frame::Array { node, count, state } => {
                    let node = *node;
                    let min = match &self.nodes[node as usize] {
                        Node::Array { min, .. } => *min,
                        _ => 0,
                    };
                    if whitespace {
                        // After an item only `]` may follow whitespace: none if it may not.
                        if *state == ArrayState::AfterItem && *count < min {
                            return;
                        }
                        return take_whitespace(alt, out);
                    }
                    match (*state, b) {
                        (ArrayState::Open | ArrayState::AfterItem, b']') if *count >= min => {
                            alt.frames.pop();
                            alt.unique_items.retain(|&(d, _)| d != depth);
                            break;
                        }
                        (ArrayState::AfterItem, b',')
                            if alt.whitespace == 0
                                && self.item(node, *count, depth).is_some()
                                && self.another_unique(node, &alt.unique_items, depth) =>
                        {
                            *state = ArrayState::AfterComma;
                            break;
                        }
                        (ArrayState::Open | ArrayState::AfterComma, _) => {
                            let Some(item) = self.item(node, *count, depth) else {
                                return;
                            };
                            *count += 1;
                            *state = ArrayState::AfterItem;
                            alt.frames.push(Frame::Value(item));
                            continue;
                        }
                        _ => return,
                    }
                }
                Frame::Object { node, seen, state } => {
                    // Other keys this object holds (`depth` counts it).
                    let others = alt.other_keys.iter().filter(|&&(d, _)| d == depth).count();
                    if whitespace {
                        match *state {
                            ObjectState::Colon(_) => return, // nothing between a key and `:`
                            // After a value only `}` may follow whitespace: none if it may not.
                            ObjectState::AfterValue if !self.may_close(*node, *seen, others) => {
                                return
                            }
                            _ => return take_whitespace(alt, out),
                        }
                    }
                    let (node, seen_now) = (*node, *seen);
                    match (*state, b) {
                        (ObjectState::Open | ObjectState::AfterValue, b'}')
                            if self.may_close(node, seen_now, others) =>
                        {
                            let depth = alt.frames.len();
                            alt.other_keys.retain(|&(d, _)| d != depth);
                            alt.frames.pop();
                        }
                        (ObjectState::AfterValue, b',')
                            if alt.whitespace == 0
                                && self.more_keys(node, seen_now, depth)
                                && self.below_max(node, seen_now, others) =>
                        {
                            *state = ObjectState::AfterComma;
                        }
                        (ObjectState::Open | ObjectState::AfterComma, b'"')
                            if self.more_keys(node, seen_now, depth)
                                && self.below_max(node, seen_now, others) =>
                        {
                            let (unseen, other) = self.next_keys(node, seen_now, depth);
                            let free = other.is_some();
                            // With other keys allowed every name is followed, so that a
                            // property written twice, or one that cannot fit, is caught when
                            // its name closes; without, only names that may come next.
                            let candidates = if free { u64::MAX } else { unseen };
                            alt.frames.push(Frame::Key {
                                node,
                                candidates,
                                at: 0,
                                text: Text::new(),
                                hash: FNV_START,
                                free,
                            });
                        }
                        (ObjectState::Colon(target), b':') => {
                            let Node::Object {
                                properties,
                                additional,
                                ..
                            } = &self.nodes[node as usize]
                            else {
                                return;
                            };
                            let schema = match properties.get(target as usize) {
                                Some((_, schema)) => *schema,
                                None => match additional {
                                    Some(schema) => *schema,
                                    None => return,
                                },
                            };
                            *state = ObjectState::AfterValue;
                            alt.frames.push(Frame::Value(schema));
                        }
                        _ => return,
                    }
                    break;
                }
            }
        }
        alt.whitespace = 0;
        out.push(alt);
    }
}

impl Matcher {
    /// Takes one byte of output; `false` (and the matcher unchanged) if no match could
    /// continue with it.
    pub fn feed(&mut self, grammar: &Grammar, b: u8) -> bool {
        let mut next = Vec::with_capacity(self.alternatives.len());
        for alt in &self.alternatives {
            grammar.step(alt.clone(), b, &mut next);
        }
        if next.is_empty() {
            return false;
        }
        if next.len() > 1 {
            let mut unique: Vec<Alternative> = Vec::with_capacity(next.len());
            for alt in next {
                if !unique.contains(&alt) {
                    unique.push(alt);
                }
            }
            next = unique;
        }
        self.alternatives = next;
        true
    }

    /// Takes several bytes; `false` (matcher unchanged) unless all were taken.
    pub fn feed_all(&mut self, grammar: &Grammar, bytes: &[u8]) -> bool {
        let mut trial = self.clone();
        for &b in bytes {
            if !trial.feed(grammar, b) {
                return false;
            }
        }
        *self = trial;
        true
    }

    /// Whether the output so far is a whole match (a number may still go on).
    pub fn can_finish(&self) -> bool {
        self.alternatives
            .iter()
            .any(|alt| match alt.frames.as_slice() {
                [] => true,
                [Frame::Number { part, .. }] => part.complete(),
                [Frame::Bounded { text, .. }] => text.complete,
                _ => false,
            })
    }

    /// Whether the output is a whole match that nothing may extend.
    pub fn is_done(&self) -> bool {
        self.alternatives.iter().all(|alt| alt.frames.is_empty())
    }
}

/// The vocabulary as bytes, in a trie, for masks.
#[derive(Debug)]
pub struct Vocabulary {
    /// Each token's bytes; `None` for special tokens, which constrained output never holds.
    bytes: Vec<Option<Box<[u8]>>>,
    /// Every token.
    all: Trie,
    /// Tokens that are plain string text (see [`plain_chars`]), with their characters:
    /// inside a string without `pattern` each may follow whenever the length allows, so
    /// masks there take them from this list and walk only [`Vocabulary::other`].
    plain: Vec<(u32, u32)>,
    /// The same tokens in a trie, for strings held to a `pattern`.
    plain_trie: Trie,
    other: Trie,
}

/// Tokens by their bytes, for masks: tokens sharing a prefix are checked once.
#[derive(Debug, Default)]
struct Trie {
    /// Nodes: children by byte, and the tokens ending here.
    children: Vec<Vec<(u8, u32)>>,
    ends: Vec<Vec<u32>>,
}

impl Trie {
    fn new() -> Self {
        Trie {
            children: vec![Vec::new()],
            ends: vec![Vec::new()],
        }
    }

    fn insert(&mut self, token: &[u8], id: u32) {
        let mut node = 0usize;
        for &b in token {
            node = match self.children[node].iter().find(|(c, _)| *c == b) {
                Some(&(_, child)) => child as usize,
                None => {
                    let child = self.children.len();
                    self.children.push(Vec::new());
                    self.ends.push(Vec::new());
                    self.children[node].push((b, child as u32));
                    child
                }
            };
        }
        self.ends[node].push(id);
    }

    /// Marks in `allowed` every token `matcher` can take whole.
    fn walk(&self, grammar: &Grammar, matcher: &Matcher, allowed: &mut [bool]) {
        self.walk_with(matcher, |m, b| m.feed(grammar, b), allowed);
    }

    /// Marks in `allowed` every token that `step` takes whole from `start`, byte by byte
    /// (`step` leaves the state unchanged when it refuses a byte).
    fn walk_with<S: Clone>(
        &self,
        start: &S,
        step: impl Fn(&mut S, u8) -> bool,
        allowed: &mut [bool],
    ) {
        let mut stack = vec![(0u32, start.clone())];
        while let Some((node, state)) = stack.pop() {
            for &(b, child) in &self.children[node as usize] {
                let mut next = state.clone();
                if !step(&mut next, b) {
                    continue;
                }
                for &t in &self.ends[child as usize] {
                    if let Some(slot) = allowed.get_mut(t as usize) {
                        *slot = true;
                    }
                }
                if !self.children[child as usize].is_empty() {
                    stack.push((child, next));
                }
            }
        }
    }
}

/// The characters of `token` if a string may hold it as it is, anywhere: whole UTF-8
/// characters, none of them a quote, a backslash or a control character.
fn plain_chars(token: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(token).ok()?;
    if text.is_empty() || text.chars().any(|c| c == '"' || c == '\\' || c < ' ') {
        return None;
    }
    Some(text.chars().count() as u32)
}

/// GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary.
fn byte_level_chars() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map: HashMap<char, u8> = printable
        .iter()
        .map(|&b| (char::from_u32(b).unwrap_or_default(), b as u8))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            map.insert(char::from_u32(256 + n).unwrap_or_default(), b as u8);
            n += 1;
        }
    }
    map
}

#[derive(PartialEq)]
enum Spelling {
    ByteLevel,
    SentencePiece,
}

fn spelling(decoder: &DecoderWrapper) -> Option<Spelling> {
    match decoder {
        DecoderWrapper::ByteLevel(_) => Some(Spelling::ByteLevel),
        DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => {
            Some(Spelling::SentencePiece)
        }
        DecoderWrapper::Sequence(sequence) => {
            let found: Vec<Spelling> = sequence
                .get_decoders()
                .iter()
                .filter_map(spelling)
                .collect();
            if found.contains(&Spelling::ByteLevel) {
                Some(Spelling::ByteLevel)
            } else {
                found.into_iter().next()
            }
        }
        _ => None,
    }
}

impl Vocabulary {
    /// Each token's bytes, from a byte-level BPE (GPT-2, Llama 3, SmolLM) or a
    /// SentencePiece vocabulary with byte fallback (Llama 2, Mistral).
    pub fn of(tokenizer: &Tokenizer) -> Result<Self, String> {
        let spelling = tokenizer.get_decoder().and_then(spelling).ok_or(
            "structured output needs a byte-level BPE or SentencePiece tokenizer; this one's decoder is neither",
        )?;
        let added = tokenizer.get_added_tokens_decoder();
        let size = tokenizer.get_vocab_size(true);
        let chars = byte_level_chars();
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None; size];
        for (token, id) in tokenizer.get_vocab(true) {
            let Some(slot) = bytes.get_mut(id as usize) else {
                continue;
            };
            *slot = match added.get(&id) {
                Some(a) if a.special => None,
                Some(a) => Some(a.content.as_bytes().into()),
                None => match spelling {
                    Spelling::ByteLevel => token
                        .chars()
                        .map(|c| chars.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .map(Vec::into_boxed_slice),
                    Spelling::SentencePiece => {
                        let hex = token
                            .strip_prefix("<0x")
                            .and_then(|t| t.strip_suffix('>'))
                            .and_then(|h| u8::from_str_radix(h, 16).ok());
                        Some(match hex {
                            Some(b) => Box::from([b]),
                            None => token
                                .replace('\u{2581}', " ")
                                .into_bytes()
                                .into_boxed_slice(),
                        })
                    }
                },
            };
        }
        let (mut all, mut other, mut plain) = (Trie::new(), Trie::new(), Vec::new());
        let mut plain_trie = Trie::new();
        for (id, token) in bytes.iter().enumerate() {
            let Some(token) = token.as_deref().filter(|t| !t.is_empty()) else {
                continue;
            };
            all.insert(token, id as u32);
            match plain_chars(token) {
                Some(chars) => {
                    plain.push((id as u32, chars));
                    plain_trie.insert(token, id as u32);
                }
                None => other.insert(token, id as u32),
            }
        }
        Ok(Vocabulary {
            bytes,
            all,
            plain,
            plain_trie,
            other,
        })
    }

    pub fn bytes(&self, token: u32) -> Option<&[u8]> {
        self.bytes.get(token as usize)?.as_deref()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// One generation's constraint: the grammar, where the output stands in it, and the
/// vocabulary it chooses tokens from.
pub struct Constraint {
    grammar: Arc<Grammar>,
    matcher: Matcher,
    vocabulary: Arc<Vocabulary>,
    /// Tokens that end generation: allowed once the output is a whole match.
    stop_tokens: Vec<u32>,
}

impl Constraint {
    pub fn new(grammar: Arc<Grammar>, vocabulary: Arc<Vocabulary>, stop_tokens: Vec<u32>) -> Self {
        let matcher = grammar.matcher();
        Self {
            grammar,
            matcher,
            vocabulary,
            stop_tokens,
        }
    }

    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        if self.stop_tokens.contains(&token) {
            return self.matcher.can_finish();
        }
        match self.vocabulary.bytes(token) {
            Some(bytes) if !bytes.is_empty() => {
                // A scratch copy fed byte by byte (feed_all would copy it again).
                let mut trial = self.matcher.clone();
                bytes.iter().all(|&b| trial.feed(&self.grammar, b))
            }
            _ => false,
        }
    }

    /// Every token that may come next, as a mask over the vocabulary (`len` entries).
    pub fn mask(&self, len: usize) -> Vec<bool> {
        let mut allowed = vec![false; len];
        if self.matcher.can_finish() {
            for &t in &self.stop_tokens {
                if let Some(slot) = allowed.get_mut(t as usize) {
                    *slot = true;
                }
            }
        }
        let v = &self.vocabulary;
        // Inside a string (one way to read the output, between characters) a plain token
        // never closes it: every one fits while the length allows, or, held to a pattern,
        // each is followed through the pattern's automaton alone. Only the other tokens
        // need the whole matcher.
        let top = match self.matcher.alternatives.as_slice() {
            [alt] => alt.frames.last(),
            _ => None,
        };
        match top {
            Some(Frame::String { max, text, .. }) if text.escape == 0 && text.pending == 0 => {
                let room = max.saturating_sub(text.chars);
                for &(t, chars) in &v.plain {
                    if chars <= room {
                        if let Some(slot) = allowed.get_mut(t as usize) {
                            *slot = true;
                        }
                    }
                }
                v.other.walk(&self.grammar, &self.matcher, &mut allowed);
            }
            Some(&Frame::Pattern { automaton, text }) if text.between_chars() => {
                let automaton = &self.grammar.automata[automaton as usize];
                let step = |text: &mut PatternText, b| {
                    let mut next = *text;
                    let took = matches!(automaton.text_step(&mut next, b), TextStep::Took);
                    if took {
                        *text = next;
                    }
                    took
                };
                v.plain_trie.walk_with(&text, step, &mut allowed);
                v.other.walk(&self.grammar, &self.matcher, &mut allowed);
            }
            _ => v.all.walk(&self.grammar, &self.matcher, &mut allowed),
        }
        allowed
    }

    /// Records that `token` was generated (one [`Self::allows`] said yes to).
    pub fn advance(&mut self, token: u32) {
        if let Some(bytes) = self.vocabulary.bytes(token) {
            self.matcher.feed_all(&self.grammar, bytes);
        }
    }

    /// The output is complete JSON that nothing may extend: generation can end.
    pub fn is_done(&self) -> bool {
        self.matcher.is_done()
    }
}

#[cfg(test)]
mod tests;
