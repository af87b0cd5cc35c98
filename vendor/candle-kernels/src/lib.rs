mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

// runner's change (vendor/README.md): machine code beside the PTX.
mod cubin {
    include!(concat!(env!("OUT_DIR"), "/cubin.rs"));
}

/// runner's change: the GPU architectures (`sm_90a`, `sm_86`) every module has machine code
/// for; empty where the build made none.
pub const CUBIN_ARCHS: &[&str] = cubin::ARCHS;

/// runner's change: the architecture the kernels' PTX targets (`sm_90a`), which decides the
/// GPUs whose driver can compile it.
pub const PTX_TARGET: Option<&str> = cubin::PTX_TARGET;

/// runner's change: the architectures of the kernels linked in as machine code (the
/// quantized matrix kernels of `ffi`), from the same `CUDA_COMPUTE_CAP`.
pub const LINKED_ARCHS: &[&str] = cubin::LINKED_ARCHS;

/// runner's change: whether the linked kernels also carry PTX (a portable build), which
/// GPUs newer than their machine code compile.
pub const LINKED_PTX: bool = cubin::LINKED_PTX;

/// runner's change: how well machine code for `arch` fits a GPU of compute capability `cc`
/// (higher is better), or `None` where it cannot run there. NVIDIA's rule: machine code runs
/// on its own major version with the same or a higher minor, except arch-specific code
/// (`sm_90a`), which runs on exactly its capability.
pub fn machine_code_fit(arch: &str, (major, minor): (u32, u32)) -> Option<u32> {
    let rest = arch.strip_prefix("sm_")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let arch_specific = &rest[digits.len()..] == "a";
    let (m, n) = digits.split_at(digits.len().checked_sub(1)?);
    let (m, n): (u32, u32) = (m.parse().ok()?, n.parse().ok()?);
    let exact = (m, n) == (major, minor);
    if exact {
        Some(100)
    } else if !arch_specific && m == major && n < minor {
        Some(n)
    } else {
        None
    }
}

/// runner's change: whether the build holds machine code for every module that runs on a
/// GPU of compute capability `cc`.
pub fn has_machine_code_for(cc: (u32, u32)) -> bool {
    CUBIN_ARCHS
        .iter()
        .any(|a| machine_code_fit(a, cc).is_some())
}

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
    cubins: &'static [(&'static str, &'static [u8])],
}

impl Module {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn ptx(&self) -> &'static str {
        self.ptx
    }

    /// runner's change: the module's machine code that fits a GPU of compute capability
    /// `cc` best ([`machine_code_fit`]), if the build has any that runs there.
    pub fn cubin_for(&self, cc: (u32, u32)) -> Option<&'static [u8]> {
        self.cubins
            .iter()
            .filter_map(|(arch, code)| Some((machine_code_fit(arch, cc)?, *code)))
            .max_by_key(|(fit, _)| *fit)
            .map(|(_, code)| code)
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
            cubins: cubin::$cst,
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

#[cfg(test)]
mod tests {
    use super::machine_code_fit;

    #[test]
    fn machine_code_runs_on_its_own_major_version_and_arch_specific_code_on_its_capability() {
        assert_eq!(machine_code_fit("sm_90a", (9, 0)), Some(100));
        assert_eq!(machine_code_fit("sm_90a", (10, 0)), None);
        assert_eq!(machine_code_fit("sm_86", (8, 9)), Some(6));
        assert_eq!(machine_code_fit("sm_80", (8, 9)), Some(0));
        assert_eq!(machine_code_fit("sm_89", (8, 6)), None);
        assert_eq!(machine_code_fit("sm_80", (9, 0)), None);
        assert_eq!(machine_code_fit("sm_100a", (10, 0)), Some(100));
        assert_eq!(machine_code_fit("compute_80", (8, 0)), None);
    }
}
