mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

// runner's change (vendor/README.md): machine code beside the PTX.
mod cubin {
    include!(concat!(env!("OUT_DIR"), "/cubin.rs"));
}

/// runner's change: the compute capability (major, minor) that [`Module::cubin`]'s machine
/// code is for; `None` where the build made none.
pub const CUBIN_COMPUTE_CAP: Option<(u32, u32)> = cubin::COMPUTE_CAP;

/// runner's change: the architecture the kernels' PTX targets (`sm_90a`), which decides the
/// GPUs whose driver can compile it.
pub const PTX_TARGET: Option<&str> = cubin::PTX_TARGET;

/// runner's change: the architecture of the kernels linked in as machine code only (the
/// quantized matrix kernels of `ffi`).
pub const LINKED_TARGET: Option<&str> = cubin::LINKED_TARGET;

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Id {
    Affine,
    Binary,
    Cast,
    Conv,
    Fill,
    Indexing,
    Quantized,
    Reduce,
    Sort,
    Ternary,
    Unary,
}

pub const ALL_IDS: [Id; 11] = [
    Id::Affine,
    Id::Binary,
    Id::Cast,
    Id::Conv,
    Id::Fill,
    Id::Indexing,
    Id::Quantized,
    Id::Reduce,
    Id::Sort,
    Id::Ternary,
    Id::Unary,
];

pub struct Module {
    index: usize,
    ptx: &'static str,
    cubin: Option<&'static [u8]>,
}

impl Module {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn ptx(&self) -> &'static str {
        self.ptx
    }

    /// runner's change: the module as machine code for a GPU of [`CUBIN_COMPUTE_CAP`].
    pub fn cubin(&self) -> Option<&'static [u8]> {
        self.cubin
    }
}

const fn module_index(id: Id) -> usize {
    let mut i = 0;
    while i < ALL_IDS.len() {
        if ALL_IDS[i] as u32 == id as u32 {
            return i;
        }
        i += 1;
    }
    panic!("id not found")
}

macro_rules! mdl {
    ($cst:ident, $id:ident) => {
        pub const $cst: Module = Module {
            index: module_index(Id::$id),
            ptx: ptx::$cst,
            cubin: cubin::$cst,
        };
    };
}

mdl!(AFFINE, Affine);
mdl!(BINARY, Binary);
mdl!(CAST, Cast);
mdl!(CONV, Conv);
mdl!(FILL, Fill);
mdl!(INDEXING, Indexing);
mdl!(QUANTIZED, Quantized);
mdl!(REDUCE, Reduce);
mdl!(SORT, Sort);
mdl!(TERNARY, Ternary);
mdl!(UNARY, Unary);

pub mod ffi;
