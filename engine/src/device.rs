//! The one place that chooses where and in which precision models run.
//!
//! - CPU (`flex`): f32 weights and compute, the precision of the parity tests.
//! - CUDA (feature `cuda`): bf16 weights and compute; latents, the scheduler
//!   and the VAE output path stay f32 (fp16 overflows in this model, see
//!   spec §2.7).
//! - wgpu (feature `wgpu`): f32, because WGSL has no bf16 (burn-wgpu 0.21
//!   refuses it: "bf16 is not a valid WgpuElement") and f16 overflows.

use burn::tensor::DType;

use crate::error::{EngineError, Result};

/// CPU backend used for tests and machines without a GPU.
pub type CpuBackend = burn::backend::Flex;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu;

/// Keeps freed tensor buffers in the process for reuse (glibc only).
///
/// Why: the CPU backend allocates a fresh output for every tensor op, and
/// glibc serves anything above its (adaptive) mmap threshold with a new
/// mapping, which the kernel zero-fills page by page on first touch: `perf`
/// showed a `medium` run spending ~8 % in page faults (865 K of them). With
/// a fixed 32 MiB threshold (glibc's maximum) and 256 MiB kept at the top of
/// the heap, those buffers come back from the allocator instead (faults
/// halved). Call once at start-up, before any thread allocates.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Keeps the CUDA kernels NVRTC compiles (their PTX) on disk, so that a
/// later process skips most of the 21–36 s its first image spends compiling
/// them (cubecl's own PTX cache, in [`kernel_cache_folder`]). GPU run 9
/// (H200): the tiny fixture's second process took 0.7 s instead of 21 s and
/// made the same image bit for bit. `ZIMAGE_KERNEL_CACHE=0` turns it off; a
/// `cubecl.toml` that sets its own cache wins.
/// Call at start-up, before anything uses cubecl; does nothing without the
/// `cuda` feature or a GPU.
pub fn keep_compiled_kernels() {
    #[cfg(feature = "cuda")]
    if kernel_cache_on() {
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
        let gpu = cuda_context().and_then(|ctx| {
            let (major, minor) = ctx.compute_capability().ok()?;
            Some(format!("{} sm{major}{minor}", ctx.name().ok()?))
        });
        let base = directories::ProjectDirs::from("io", "zimage", "zimage-studio").map(|d| d.cache_dir().join("cuda-kernels"));
        let (Some(gpu), Some(base), Ok(exe)) = (gpu, base, std::env::current_exe()) else { return };
        let Some(folder) = kernel_cache_folder(&base, &exe, &gpu) else { return };
        // Read as cubecl would (cubecl.toml, then its environment variables), plus the cache.
        if CubeClRuntimeConfig::storage().lock().is_some() {
            return;
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = Some(CacheConfig::File(folder));
        }
        CubeClRuntimeConfig::set(config);
    }
}

/// Whether the compiled-kernel cache is wanted: unless `ZIMAGE_KERNEL_CACHE=0`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_cache_on() -> bool {
    std::env::var("ZIMAGE_KERNEL_CACHE").map_or(true, |v| v != "0")
}

/// The folder for the compiled kernels of `exe` on `gpu` under `base`:
/// `base/<exe name>/<build stamp> <gpu>`, created and checked writable, the
/// folders of this program's earlier builds removed. One per build because
/// cubecl keys a kernel by its signature, not its body: a kernel changed
/// by an update would otherwise load the old build's PTX. The stamp is the
/// executable's size and modification time. `None` where it cannot be made.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_cache_folder(base: &std::path::Path, exe: &std::path::Path, gpu: &str) -> Option<std::path::PathBuf> {
    let meta = std::fs::metadata(exe).ok()?;
    let modified = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let stamp = format!("{:x}-{modified:x}", meta.len());
    let safe = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>();
    let parent = base.join(safe(&exe.file_name()?.to_string_lossy()));
    let folder = parent.join(format!("{stamp} {}", safe(gpu)));
    std::fs::create_dir_all(&folder).ok()?;
    let probe = folder.join(".writable");
    std::fs::write(&probe, b"").ok()?;
    std::fs::remove_file(&probe).ok()?;
    for old in std::fs::read_dir(&parent).ok()?.flatten() {
        let name = old.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&stamp) && old.path().is_dir() {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    Some(folder)
}

/// A device the user can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Wgpu,
}

/// A compute dtype as messages name it: "f32", "bf16", "f16".
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

impl DeviceKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "wgpu" | "vulkan" | "metal" => Ok(Self::Wgpu),
            other => Err(EngineError::Device(format!("unknown device {other:?}; use cpu, cuda or wgpu"))),
        }
    }

    /// Weight and compute dtype on this device.
    pub fn weight_dtype(self) -> DType {
        match self {
            Self::Cpu => DType::F32,
            Self::Cuda => DType::BF16,
            Self::Wgpu => DType::F32,
        }
    }

    /// Whether this build can use the device at all.
    pub fn compiled_in(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Cuda => cfg!(feature = "cuda"),
            Self::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// Checks the device is compiled in and present, with a clear message.
    pub fn ensure_available(self) -> Result<()> {
        if !self.compiled_in() {
            let feature = if self == Self::Cuda { "cuda" } else { "wgpu" };
            return Err(EngineError::Device(format!(
                "this build has no {feature} support; rebuild with `--features {feature}` or use --device cpu"
            )));
        }
        match self {
            Self::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Self::Cuda => probe::<CudaBackend>("CUDA (is the NVIDIA driver and CUDA toolkit installed?)"),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => probe::<WgpuBackend>("a Vulkan/Metal GPU"),
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }
}

/// Host memory the system can still give this process without swapping
/// (`MemAvailable` of /proc/meminfo), at most [`memory_limit`]; `None` where
/// neither is known.
pub fn host_available_memory() -> Option<u64> {
    let measured = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| parse_mem_available(&text));
    at_most_the_limit(measured)
}

/// `ZIMAGE_MEMORY_LIMIT_GB`: the most memory the engine plans with (host
/// memory on the CPU, GPU memory on CUDA), e.g. to leave room for other
/// programs. The memory plans, the size checks and the weights check count
/// against it. A value that is not a number of GB is ignored, with a warning.
pub fn memory_limit() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let text = std::env::var("ZIMAGE_MEMORY_LIMIT_GB").ok()?;
        let parsed = parse_limit_gb(&text);
        if parsed.is_none() {
            eprintln!("warning: ZIMAGE_MEMORY_LIMIT_GB={text:?} is not a number of GB; ignored");
        }
        parsed
    })
}

fn parse_limit_gb(text: &str) -> Option<u64> {
    let gb: f64 = text.trim().parse().ok()?;
    (gb.is_finite() && gb >= 0.0).then_some((gb * 1e9) as u64)
}

fn at_most_the_limit(measured: Option<u64>) -> Option<u64> {
    match (measured, memory_limit()) {
        (Some(m), Some(limit)) => Some(m.min(limit)),
        (m, limit) => m.or(limit),
    }
}

/// The first CUDA GPU's primary context, or `None` when the driver library
/// is missing (a CUDA build on a machine without NVIDIA's driver: cudarc
/// panics on its first call then, and every command, `--device cpu` too,
/// failed at start-up) or no GPU answers.
#[cfg(feature = "cuda")]
fn cuda_context() -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
    if !cuda_driver_present() {
        return None;
    }
    cudarc::driver::CudaContext::new(0).ok()
}

/// Whether NVIDIA's driver library (libcuda) loads, checked once.
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to load the library; nothing is called through it.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Free and total memory of the first CUDA GPU in bytes, from the driver
/// (`cuMemGetInfo` on its primary context, the one burn-cuda uses); `None`
/// when no GPU answers.
#[cfg(feature = "cuda")]
pub fn cuda_memory() -> Option<(u64, u64)> {
    let ctx = cuda_context()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// A GPU's memory as its allocator sees it (cubecl's memory pools; the
/// driver, and so nvidia-smi, sees `reserved` plus the CUDA context).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DeviceMemory {
    /// Bytes held by live tensors.
    pub in_use: u64,
    /// Bytes the pools hold from the driver: live tensors, their padding and
    /// the free space of the pages the pools keep for reuse.
    pub reserved: u64,
}

/// The memory of `device` if it is a CUDA or wgpu device; `None` on the CPU.
///
/// Why both numbers: the pools slice large pages (on CUDA a quarter of the
/// card, then quarters of that) and keep them, so what the driver reports can
/// be far above what the tensors need; this separates the two.
pub fn device_memory<B: burn::tensor::backend::Backend>(device: &B::Device) -> Option<DeviceMemory> {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        fn on<R: burn_cubecl::CubeRuntime>(device: &dyn std::any::Any) -> Option<DeviceMemory> {
            let device = device.downcast_ref::<R::Device>()?;
            let usage = R::client(device).memory_usage().ok()?;
            Some(DeviceMemory { in_use: usage.bytes_in_use, reserved: usage.bytes_reserved })
        }
        let any: &dyn std::any::Any = device;
        #[cfg(feature = "cuda")]
        if let Some(m) = on::<cubecl::cuda::CudaRuntime>(any) {
            return Some(m);
        }
        #[cfg(feature = "wgpu")]
        if let Some(m) = on::<cubecl::wgpu::WgpuRuntime>(any) {
            return Some(m);
        }
    }
    let _ = device;
    None
}

/// The memory a memory plan may use on `kind`, measured before any model is
/// loaded, and how to name it in a sentence: host memory available on the
/// CPU, free GPU memory on CUDA; `None` for wgpu, which cannot say.
pub fn memory_budget(kind: DeviceKind) -> (Option<u64>, String) {
    match kind {
        DeviceKind::Cpu => (host_available_memory(), "host memory available".into()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => match cuda_memory() {
            Some((free, total)) => {
                (at_most_the_limit(Some(free)), format!("free on the GPU (of {:.1} GB)", total as f64 / 1e9))
            }
            None => (None, "the CUDA driver".into()),
        },
        #[allow(unreachable_patterns)]
        DeviceKind::Cuda => (None, "CUDA".into()),
        DeviceKind::Wgpu => (None, "wgpu".into()),
    }
}

/// One line of `zimage devices`: a device kind and what this machine and
/// build can do with it, in words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceLine {
    /// `cpu`, `cuda` or `wgpu`, as `--device` takes it.
    pub device: &'static str,
    /// Whether `--device` with it would run.
    pub usable: bool,
    /// What it is, or why it cannot be used, in one line.
    pub status: String,
}

/// What each device is on this machine, for `zimage devices`: the first
/// thing to read when an image is slower than expected or `--device auto`
/// chose the CPU. Probes the GPUs (a tiny op each, a few seconds at most).
pub fn describe_devices() -> Vec<DeviceLine> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = host_available_memory().map_or("memory available unknown".to_string(), |b| format!("{} available", crate::memory::gigabytes(b)));
    let cpu = DeviceLine { device: "cpu", usable: true, status: format!("{threads} threads, {memory}; runs f32") };
    let not_built = |device: &'static str| DeviceLine {
        device,
        usable: false,
        status: format!("not in this build (rebuild with `--features {device}`)"),
    };
    #[cfg(feature = "cuda")]
    let cuda = describe_cuda();
    #[cfg(not(feature = "cuda"))]
    let cuda = not_built("cuda");
    #[cfg(feature = "wgpu")]
    let wgpu = match DeviceKind::Wgpu.ensure_available() {
        Ok(()) => DeviceLine { device: "wgpu", usable: true, status: "a Vulkan/Metal GPU answers (the first adapter); runs f32".into() },
        Err(e) => DeviceLine { device: "wgpu", usable: false, status: e.to_string() },
    };
    #[cfg(not(feature = "wgpu"))]
    let wgpu = not_built("wgpu");
    vec![cpu, cuda, wgpu]
}

#[cfg(feature = "cuda")]
fn describe_cuda() -> DeviceLine {
    let unusable = |status: String| DeviceLine { device: "cuda", usable: false, status };
    if !cuda_driver_present() {
        return unusable("no NVIDIA driver (libcuda was not found)".into());
    }
    let Some(ctx) = cuda_context() else {
        return unusable("the NVIDIA driver is there but no GPU answers".into());
    };
    let name = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
    let arch = ctx.compute_capability().map(|(major, minor)| format!(", sm{major}{minor}")).unwrap_or_default();
    let memory = match ctx.mem_get_info() {
        Ok((free, total)) => format!(", {} free of {}", crate::memory::gigabytes(free as u64), crate::memory::gigabytes(total as u64)),
        Err(_) => String::new(),
    };
    if let Err(e) = DeviceKind::Cuda.ensure_available() {
        return unusable(format!("{name}{arch}{memory}: {e}"));
    }
    let cache = if kernel_cache_on() { "on" } else { "off (ZIMAGE_KERNEL_CACHE=0)" };
    let cublas = match crate::cublas::available(0) {
        Ok(()) => "loads".to_string(),
        Err(why) => format!("not available ({why})"),
    };
    DeviceLine {
        device: "cuda",
        usable: true,
        status: format!("{name}{arch}{memory}; runs bf16; compiled-kernel cache {cache}; cuBLAS {cublas}"),
    }
}

/// Resident memory of this process (`/proc/self/statm`); `None` where unknown.
pub fn process_resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs one tiny op on the backend's default device; backends panic when
/// their driver is missing, so the panic is caught and turned into a message.
#[allow(dead_code)]
fn probe<B: burn::tensor::backend::Backend>(what: &str) -> Result<()> {
    // The backend's panic is expected here: keep it off the user's terminal.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let device = B::Device::default();
        let t = burn::tensor::Tensor::<B, 1>::ones([4], &device);
        t.sum().into_scalar().elem::<f32>()
    });
    std::panic::set_hook(hook);
    use burn::tensor::ElementConversion;
    match ok {
        Ok(v) if (v - 4.0).abs() < 1e-3 => Ok(()),
        _ => Err(EngineError::Device(format!("no usable GPU found: this needs {what}"))),
    }
}

#[cfg(test)]
mod tests {
    /// Run in a `cuda` build on a machine without NVIDIA's driver (as this
    /// project's CI machines are): start-up and the memory plan must carry on.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_cuda_build_without_the_driver_starts_and_plans_without_a_gpu() {
        super::keep_compiled_kernels();
        if !super::cuda_driver_present() {
            assert_eq!(super::cuda_memory(), None);
            assert_eq!(super::memory_budget(super::DeviceKind::Cuda).0, None);
        }
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(super::parse_mem_available(text), Some(12_345_678 * 1024));
        assert_eq!(super::parse_mem_available("MemTotal: 1 kB\n"), None);
        #[cfg(target_os = "linux")]
        assert!(super::host_available_memory().is_some_and(|b| b > 0));
    }

    #[test]
    fn the_kernel_cache_has_a_folder_per_build_and_gpu_and_drops_older_builds() {
        let root = std::env::temp_dir().join(format!("zimage-kernel-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let exe = root.join("zimage");
        std::fs::write(&exe, b"build one").unwrap();
        let base = root.join("cache");
        let h100 = super::kernel_cache_folder(&base, &exe, "NVIDIA H100 80GB HBM3 sm90").unwrap();
        let a100 = super::kernel_cache_folder(&base, &exe, "NVIDIA A100 sm80").unwrap();
        assert!(h100.is_dir() && a100.is_dir() && h100 != a100);
        assert_eq!(h100.parent(), Some(base.join("zimage").as_path()));
        assert!(h100.file_name().unwrap().to_string_lossy().ends_with("NVIDIA_H100_80GB_HBM3_sm90"));
        // Another build of the program (another size): a new folder, the old build's gone.
        std::fs::write(&exe, b"build number two").unwrap();
        let next = super::kernel_cache_folder(&base, &exe, "NVIDIA H100 80GB HBM3 sm90").unwrap();
        assert!(next.is_dir() && next != h100);
        assert!(!h100.exists() && !a100.exists());
        // Nowhere to write: no cache, no error.
        assert_eq!(super::kernel_cache_folder(&exe.join("not-a-folder"), &exe, "gpu"), None);
        assert_eq!(super::kernel_cache_folder(&base, &root.join("missing"), "gpu"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_cpu_has_no_device_memory_to_report() {
        assert_eq!(super::device_memory::<super::CpuBackend>(&Default::default()), None);
    }

    #[test]
    fn memory_limits_parse_as_gigabytes() {
        assert_eq!(super::parse_limit_gb("8"), Some(8_000_000_000));
        assert_eq!(super::parse_limit_gb(" 0.5 "), Some(500_000_000));
        assert_eq!(super::parse_limit_gb("8GB"), None);
        assert_eq!(super::parse_limit_gb("-1"), None);
        assert_eq!(super::parse_limit_gb("inf"), None);
    }

    /// Lavapipe here (`cargo test --release -p zimage-engine --features wgpu --lib device`).
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_reports_live_and_reserved_bytes() {
        use burn::tensor::Tensor;
        type B = super::WgpuBackend;
        let device = Default::default();
        let before = super::device_memory::<B>(&device).expect("a wgpu device reports its memory");
        let t = Tensor::<B, 2>::ones([1024, 1024], &device);
        let after = super::device_memory::<B>(&device).expect("a wgpu device reports its memory");
        assert!(after.in_use >= before.in_use + 4 << 20, "{before:?} -> {after:?}");
        assert!(after.reserved >= after.in_use, "{after:?}");
        drop(t);
    }
}
