//! A model's Input/Output signature, in the terms Cog's schema generator uses for Python
//! predictors (`str`, `int`, `Path`, `Secret`, `Optional[...]`, `List[...]`, `Input(...)`
//! constraints, `BaseModel` outputs, iterators), so that the OpenAPI document built from it
//! is the one Cog would write for the equivalent `predict()`.

use serde_json::Value;

/// Cog's primitive types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Bool,
    Float,
    Int,
    Str,
    /// `cog.Path`: a file, sent as a URL or data URI.
    Path,
    /// `cog.File` (deprecated): schema-identical to `Path`.
    File,
    /// `cog.Secret`: a string that is never echoed back.
    Secret,
    /// `Any`: an opaque JSON value.
    Any,
}

/// The declared type of one input.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    Prim(Primitive),
    /// `List[T]`.
    List(Primitive),
    /// `Union[A, B, ...]`.
    Union(Vec<FieldType>),
}

/// One input of `predict()`, with its `Input(...)` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct InputField {
    pub name: String,
    pub ty: FieldType,
    /// Declared `Optional[...]`.
    pub optional: bool,
    /// `None`: no default. `Some(Value::Null)`: `default=None`.
    pub default: Option<Value>,
    pub description: Option<String>,
    pub ge: Option<f64>,
    pub le: Option<f64>,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub regex: Option<String>,
    pub choices: Vec<Value>,
    pub deprecated: bool,
}

impl InputField {
    pub fn new(name: &str, ty: FieldType) -> Self {
        InputField {
            name: name.to_string(),
            ty,
            optional: false,
            default: None,
            description: None,
            ge: None,
            le: None,
            min_length: None,
            max_length: None,
            regex: None,
            choices: Vec::new(),
            deprecated: false,
        }
    }
    pub fn prim(name: &str, p: Primitive) -> Self {
        Self::new(name, FieldType::Prim(p))
    }
    pub fn list(name: &str, p: Primitive) -> Self {
        Self::new(name, FieldType::List(p))
    }
    pub fn description(mut self, d: &str) -> Self {
        self.description = Some(d.to_string());
        self
    }
    pub fn default(mut self, v: Value) -> Self {
        self.default = Some(v);
        self
    }
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
    pub fn ge(mut self, v: f64) -> Self {
        self.ge = Some(v);
        self
    }
    pub fn le(mut self, v: f64) -> Self {
        self.le = Some(v);
        self
    }
    pub fn min_length(mut self, v: u64) -> Self {
        self.min_length = Some(v);
        self
    }
    pub fn max_length(mut self, v: u64) -> Self {
        self.max_length = Some(v);
        self
    }
    pub fn regex(mut self, r: &str) -> Self {
        self.regex = Some(r.to_string());
        self
    }
    pub fn choices(mut self, c: Vec<Value>) -> Self {
        self.choices = c;
        self
    }
    pub fn deprecated(mut self) -> Self {
        self.deprecated = true;
        self
    }

    /// Nullable as Cog decides it: `Optional[...]`, or a bare `Secret` with `default=None`.
    pub fn is_nullable(&self) -> bool {
        self.optional
            || (self.ty == FieldType::Prim(Primitive::Secret) && self.default == Some(Value::Null))
    }

    /// Whether a default applies: `default=None` on a non-nullable field is Cog's "no default".
    pub fn effective_default(&self) -> Option<&Value> {
        match &self.default {
            Some(Value::Null) if !self.is_nullable() => None,
            d => d.as_ref(),
        }
    }
}

/// The declared return type of `predict()`.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputType {
    Prim(Primitive),
    List(Box<OutputType>),
    /// A `BaseModel`: fields in declaration order, `(name, type, required)`.
    Object(Vec<(String, OutputType, bool)>),
    /// `Iterator[T]`: streamed items.
    Iterator(Box<OutputType>),
    /// `ConcatenateIterator[T]`: streamed text pieces.
    ConcatenateIterator(Box<OutputType>),
}

/// A model's whole signature.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub inputs: Vec<InputField>,
    pub output: OutputType,
    /// `@cog.streaming`: the predict operation advertises `x-cog-streaming`.
    pub streaming: bool,
}
