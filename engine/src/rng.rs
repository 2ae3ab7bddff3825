//! Bit-exact re-implementation of PyTorch's CPU random normal generator.
//!
//! `zimage generate --seed N` must produce the same initial noise as
//!
//! ```python
//! g = torch.Generator().manual_seed(N)          # CPU generator
//! torch.randn(shape, generator=g, dtype=torch.float32)
//! ```
//!
//! so that an image made here can be reproduced in diffusers or ComfyUI (both
//! draw their initial latents from a CPU generator by default) and vice versa.
//!
//! # What PyTorch does (checked against the torch 2.15.0 sources and binary)
//!
//! * **Engine.** `at::mt19937`: the reference MT19937 (Matsumoto–Nishimura
//!   2002 `init_genrand`) seeded with the **low 32 bits** of the 64-bit seed
//!   (`manual_seed(5)` and `manual_seed(2**32 + 5)` give the same stream).
//!   `random()` is one 32-bit output, `random64()` is `(first << 32) | second`.
//! * **Uniforms.** `uniform_real_distribution<float>(0, 1)` is
//!   `(random() & (2^24 - 1)) * 2^-24`; the `double` one is
//!   `(random64() & (2^53 - 1)) * 2^-53`.
//! * **`randn` → `normal_(0, 1)` → `normal_kernel`**, which picks by size:
//!   - `numel >= 16` (contiguous): `normal_fill`. It first draws `numel` float
//!     uniforms into the output, then runs a Box–Muller step over every full
//!     block of 16 (`u1 = 1 - d[j]`, `u2 = d[j + 8]`, `d[j] = r cos θ`,
//!     `d[j + 8] = r sin θ`, `r = sqrt(-2 ln u1)`, `θ = 2π u2`). If `numel % 16
//!     != 0` it then draws **16 fresh uniforms** into the last 16 slots and
//!     transforms that block again (so it consumes `numel + 16` words).
//!     The per-block math depends on the CPU kernel torch dispatched to:
//!     - x86-64 with AVX2 **or** AVX-512 (`torch.backends.cpu.get_cpu_capability()`
//!       is `AVX2` or `AVX512`): `normal_stub` is deliberately not registered for
//!       AVX-512, so both run the AVX2 kernel, whose `log`/`sincos` are the
//!       Cephes polynomials of `avx_mathfun.h`. GCC fused many of its
//!       multiply/add pairs into FMA instructions; [`NormalKernel::Avx2`]
//!       reproduces the exact instruction sequence of the shipped
//!       `libtorch_cpu.so` (read from its disassembly; the torch 2.5.1 wheel
//!       has the same sequence) with plain IEEE operations and `mul_add`, so
//!       it is bit-exact on any machine.
//!     - CPUs without AVX2, aarch64, or `ATEN_CPU_CAPABILITY=default`: the
//!       generic kernel calls the C library's `logf`, `sinf`/`cosf` and `fmaf`.
//!       [`NormalKernel::Generic`] does the same through Rust's `f32` methods,
//!       which call the platform libm, so it matches torch run on the same
//!       platform (checked on x86-64 glibc).
//!   - `numel < 16` (or non-contiguous): a serial loop over
//!     `normal_distribution<double>`: two double uniforms `u1`, `u2`,
//!     `r = sqrt(-2 log1p(-u2))`, `θ = 2π u1`, returns `r cos θ` and **caches
//!     `r sin θ` in the generator**, which the next scalar draw returns
//!     (even across `randn` calls; the size ≥ 16 path neither reads nor clears
//!     it, and `manual_seed` clears it). This path uses the platform libm's
//!     double `log1p`/`sin`/`cos` (torch does the same).
//!
//! [`TorchGenerator`] keeps the same state (engine + cached double normal) so
//! successive calls continue exactly as successive `torch.randn(..., generator=g)`
//! calls on one generator do.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 engine with PyTorch's (= reference) seeding and output.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; MT_N],
    /// Index of the next word to temper and return; `MT_N` means "regenerate".
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937").field("index", &self.index).finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// Seeds like `at::mt19937(seed)`: only the low 32 bits of `seed` are used.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: MT_N }
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..MT_N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % MT_N] & LOWER_MASK);
            let mag = if s[(i + 1) % MT_N] & 1 != 0 { MATRIX_A } else { 0 };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// Next tempered 32-bit output.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.regenerate();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Which block kernel `randn` uses for tensors of 16 or more elements.
/// (Smaller tensors always take torch's scalar double path.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalKernel {
    /// torch on x86-64 with AVX2 or AVX-512: the default, and what diffusers and
    /// ComfyUI users on a PC get. Pure IEEE arithmetic: bit-exact everywhere.
    #[default]
    Avx2,
    /// torch's generic kernel (no AVX2, aarch64, `ATEN_CPU_CAPABILITY=default`).
    /// Uses the platform libm, so it matches torch on the same platform only.
    Generic,
}

/// PyTorch's `torch.Generator()` (CPU) with `manual_seed`, reproducing
/// `torch.randn(..., dtype=torch.float32)` bit for bit.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchGenerator {
    /// Like `torch.Generator().manual_seed(seed)`. Negative Python seeds map to
    /// `seed as u64` (torch does the same); only the low 32 bits affect output.
    pub fn manual_seed(seed: u64) -> Self {
        TorchGenerator {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal: None,
            kernel: NormalKernel::default(),
        }
    }

    /// Chooses the block kernel used for `randn` of 16 or more elements.
    pub fn with_kernel(mut self, kernel: NormalKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The block kernel in use.
    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// The seed given to [`TorchGenerator::manual_seed`] (`g.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// `CPUGeneratorImpl::random()`: one 32-bit engine output.
    #[inline]
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64()`: `(first << 32) | second`.
    #[inline]
    pub fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits in `[0, 1)`.
    #[inline]
    pub fn uniform_f32(&mut self) -> f32 {
        (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits in `[0, 1)`.
    #[inline]
    pub fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One draw of `normal_distribution<double>(0, 1)`, including torch's
    /// one-sample cache (the scalar path of `randn` for fewer than 16 values).
    pub fn normal_f64(&mut self) -> f64 {
        // torch returns `sample * std + mean` with std = 1, mean = 0; the
        // `+ 0.0` keeps its one visible effect: a -0.0 sample becomes +0.0.
        if let Some(cached) = self.next_double_normal.take() {
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }

    /// `torch.randn(numel, generator=self, dtype=torch.float32)` for a
    /// contiguous tensor of `numel` elements (any shape: only the element
    /// count matters).
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; numel];
        self.randn_into(&mut out);
        out
    }

    /// [`TorchGenerator::randn`] into an existing buffer (`out.len()` elements).
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        let kernel = self.kernel;
        for block in out.chunks_exact_mut(16) {
            box_muller_16(kernel, block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(kernel, tail);
        }
    }
}

fn box_muller_16(kernel: NormalKernel, d: &mut [f32]) {
    debug_assert_eq!(d.len(), 16);
    match kernel {
        NormalKernel::Avx2 => {
            for j in 0..8 {
                let (c, s) = avx2_lane(d[j], d[j + 8]);
                d[j] = c;
                d[j + 8] = s;
            }
        }
        NormalKernel::Generic => {
            for j in 0..8 {
                let u1 = 1.0f32 - d[j];
                let u2 = d[j + 8];
                let radius = (-2.0f32 * u1.ln()).sqrt();
                // `2.0f * c10::pi<double> * u2` is evaluated in double, then narrowed.
                let theta = (2.0f64 * std::f64::consts::PI * u2 as f64) as f32;
                // torch: std::fma(radius * cos, std = 1, mean = 0), which is
                // `radius * cos + 0.0` exactly (-0.0 becomes +0.0).
                d[j] = radius * theta.cos() + 0.0;
                d[j + 8] = radius * theta.sin() + 0.0;
            }
        }
    }
}

// Constants of avx_mathfun.h (Cephes), as the f32 bit patterns in libtorch_cpu.so.
const MIN_NORM_POS: f32 = f32::MIN_POSITIVE; // 0x00800000
const SQRTHF: f32 = f32::from_bits(0x3f35_04f3);
const LOG_P: [f32; 9] = [
    f32::from_bits(0x3d90_21bb), // 7.0376836292E-2
    f32::from_bits(0xbdeb_d1b8), // -1.1514610310E-1
    f32::from_bits(0x3def_251a), // 1.1676998740E-1
    f32::from_bits(0xbdfe_5d4f), // -1.2420140846E-1
    f32::from_bits(0x3e11_e9bf), // 1.4249322787E-1
    f32::from_bits(0xbe2a_ae50), // -1.6668057665E-1
    f32::from_bits(0x3e4c_ceac), // 2.0000714765E-1
    f32::from_bits(0xbe7f_fffc), // -2.4999993993E-1
    f32::from_bits(0x3eaa_aaaa), // 3.3333331174E-1
];
const LOG_Q1: f32 = f32::from_bits(0xb95e_8083); // -2.12194440e-4
const LOG_Q2: f32 = f32::from_bits(0x3f31_8000); // 0.693359375
const TWO_PI_F32: f32 = f32::from_bits(0x40c9_0fdb); // (float)(2 * pi)
const FOPI: f32 = f32::from_bits(0x3fa2_f983); // 4 / pi
const MINUS_DP1: f32 = f32::from_bits(0xbf49_0000); // -0.78515625
const MINUS_DP2: f32 = f32::from_bits(0xb97d_a000); // -2.4187564849853515625e-4
const MINUS_DP3: f32 = f32::from_bits(0xb322_2169); // -3.77489497744594108e-8
const COSCOF: [f32; 3] = [
    f32::from_bits(0x37cc_f5ce), // 2.443315711809948E-005
    f32::from_bits(0xbab6_061a), // -1.388731625493765E-003
    f32::from_bits(0x3d2a_aaa5), // 4.166664568298827E-002
];
const SINCOF: [f32; 3] = [
    f32::from_bits(0xb94c_a1f9), // -1.9515295891E-4
    f32::from_bits(0x3c08_839e), // 8.3321608736E-3
    f32::from_bits(0xbe2a_aaa3), // -1.6666654611E-1
];

/// `log256_ps` for one lane, in the exact operation order of the shipped AVX2
/// kernel (multiply/add pairs that GCC fused are `mul_add` here).
#[inline]
fn avx2_log(x: f32) -> f32 {
    // _CMP_LE_OS: false for NaN.
    let invalid = x <= 0.0;
    // vmaxps(x, min_norm): returns the second operand unless x > min_norm.
    let x = if x > MIN_NORM_POS { x } else { MIN_NORM_POS };
    let bits = x.to_bits();
    let exponent = ((bits >> 23) as i32).wrapping_sub(0x7f);
    let mant = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = mant < SQRTHF;
    let tmp = if below { mant } else { 0.0 };
    e -= if below { 1.0 } else { 0.0 };
    let x = (mant + -1.0) + tmp;
    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * LOG_Q1);
    y = (-z).mul_add(0.5, y);
    let x = x + y;
    let r = e.mul_add(LOG_Q2, x);
    if invalid {
        f32::from_bits(r.to_bits() | 0xffff_ffff)
    } else {
        r
    }
}

/// `sincos256_ps` for one lane; returns `(sin, cos)`.
#[inline]
fn avx2_sincos(theta: f32) -> (f32, f32) {
    let sign_in = theta.to_bits() & 0x8000_0000;
    let x = f32::from_bits(theta.to_bits() & 0x7fff_ffff);
    // cvttps2dq; the Box–Muller angle is < 2*pi so it never overflows.
    let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!j.wrapping_sub(2) & 4) as u32) << 29;
    let use_sin_poly_for_sin = (j & 2) == 0;
    let x = y.mul_add(MINUS_DP1, x);
    let x = MINUS_DP2.mul_add(y, x);
    let x = y.mul_add(MINUS_DP3, x);
    let z = x * x;
    let half_z = z * 0.5;
    let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = z.mul_add(yc, -half_z);
    yc += 1.0;
    let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = x.mul_add(ys, x);
    // Blend exactly as the kernel does (and/andnot, subtract, add), so that
    // signed zeros come out the same.
    let (sin_part_s, sin_part_c) = if use_sin_poly_for_sin { (ys, 0.0) } else { (0.0, yc) };
    let cos_s = ys - sin_part_s;
    let cos_c = yc - sin_part_c;
    let sin = sin_part_s + sin_part_c;
    let cos = cos_s + cos_c;
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

/// One lane of torch's AVX2 `NormalFill16<float>` with mean 0, std 1:
/// returns the values stored at `d[j]` and `d[j + 8]`.
#[inline]
fn avx2_lane(a: f32, b: f32) -> (f32, f32) {
    let u1 = 1.0f32 - a;
    let radius = (avx2_log(u1) * -2.0).sqrt();
    let theta = TWO_PI_F32 * b;
    let (s, c) = avx2_sincos(theta);
    // fmadd(n, std = 1, mean = 0) is exactly `n + 0.0` (-0.0 becomes +0.0,
    // which happens when the uniform is 0 and the radius is -0.0).
    (radius * c + 0.0, radius * s + 0.0)
}

/// A fresh random seed for "no seed given": OS-seeded SipHash keys (std's
/// `RandomState`) mixed with the time and process id. Not cryptographic.
pub fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    let local = 0u8;
    h.write_usize(&local as *const u8 as usize);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference MT19937 outputs (mt19937ar init_genrand(5489): first and
    /// 10000th outputs as in the C++ standard).
    #[test]
    fn mt19937_matches_reference() {
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        for _ in 1..9999 {
            mt.next_u32();
        }
        assert_eq!(mt.next_u32(), 4_123_659_995);
    }

    #[test]
    fn only_low_32_bits_of_seed_matter() {
        let a = TorchGenerator::manual_seed(5).randn(40);
        let b = TorchGenerator::manual_seed((1u64 << 32) + 5).randn(40);
        assert_eq!(bits(&a), bits(&b));
        let c = TorchGenerator::manual_seed(u64::MAX).randn(3);
        let d = TorchGenerator::manual_seed(u32::MAX as u64).randn(3);
        assert_eq!(bits(&c), bits(&d));
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn fnv1a64(v: &[f32]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in v {
            for b in x.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    /// (seed, numel, first 8 bits, last 8 bits) of a fresh generator's
    /// `torch.randn(numel)`; for numel <= 16 the second list is every value.
    /// From torch 2.15.0, CPU, capability AVX512 (same output as AVX2).
    const SPOT: &[(u64, usize, &[u32], &[u32])] = &[
        (0, 1, &[], &[0x3fc53f5c]),
        (0, 5, &[], &[0x3fc53f5c, 0xbe963c50, 0xc00b7149, 0x3f1184b6, 0xbf8ad1a1]),
        (42, 15, &[], &[
            0x3eac62ae, 0x3e03e69d, 0x3e7016e7, 0x3e6bdc6c, 0xbf8fb9c2, 0xbe3eccd8, 0x400d532c,
            0xbf2353c6, 0x3eec5e56, 0x3e88e237, 0x3f08ef83, 0x3f4f3209, 0x3f8e1dfe, 0xbfd84b55,
            0xbf7d2c7a,
        ]),
        (42, 16, &[], &[
            0x3ff6a529, 0x3fbe5f53, 0x3f669567, 0xc006c0db, 0x3f2dacd5, 0xbf9e0591, 0xbd306786,
            0xbfcd65ba, 0xbf408bf0, 0x3fd3095b, 0xbec8f2f6, 0xbfb3a966, 0xbf3a566e, 0xbf0f36d1,
            0xbf44d2a0, 0x3f432f9f,
        ]),
        (0, 17,
            &[0xbf901b85, 0xbfd91446, 0x3f111004, 0x3f4b235d, 0x3f194d8b, 0xbfc70d5b, 0xbeaec6ca, 0x3fed2f4e],
            &[0xbf15e32b, 0xbe318eeb, 0x3e3be1a4, 0x3fb1d6c0, 0x3fcb0d00, 0x3f72409c, 0xbf57fb33, 0x3f6e8c30]),
        (1234567890123, 100,
            &[0xbf118bf0, 0xbe4bff8d, 0x3f851e36, 0xbeffc6bc, 0x3f315647, 0xbfc25ea2, 0xbf39ccd0, 0x3f69e6b7],
            &[0xbf1cb44f, 0xc02e7eac, 0xbfd70747, 0x3bb52d11, 0x3df087ec, 0x3d25efcc, 0x400983bc, 0x3f3ec11a]),
        (u64::MAX, 960,
            &[0xc02a83da, 0xbf8ba77b, 0x3ee7241e, 0x3e69d763, 0x3ff305e9, 0x3fc837ff, 0xbfa0b0f0, 0x3f4b2c45],
            &[0x3f5269f6, 0xbafd9c4b, 0xbe032381, 0x3f0bff96, 0x400af477, 0x3f9bcb78, 0x3e539f1e, 0xbf3acdcb]),
        (42, 2000,
            &[0x3ff6a529, 0x3fbe5f53, 0x3f669567, 0xc006c0db, 0x3f2dacd5, 0xbf9e0591, 0xbd306786, 0xbfcd65ba],
            &[0xbfa5811e, 0x3f612b3b, 0x3d95a2bc, 0x3f7f2a1b, 0x3f830b96, 0xbf9b4bd5, 0x3f7975ce, 0x3ee80d69]),
    ];

    #[test]
    fn spot_values_match_torch() {
        for &(seed, n, head, tail) in SPOT {
            let v = TorchGenerator::manual_seed(seed).randn(n);
            let b = bits(&v);
            assert_eq!(&b[..head.len()], head, "seed {seed} numel {n}: first values");
            assert_eq!(&b[n - tail.len()..], tail, "seed {seed} numel {n}: last values");
        }
    }

    /// Every value of the cases listed in tests/data/gen_torch_randn_fixtures.py
    /// (fresh generators, and one generator used for several calls in a row).
    #[test]
    fn every_value_matches_torch_fixture() {
        let raw: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_randn_cpu.bin"));
        let want: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        const SIZES: &[usize] = &[1, 5, 15, 16, 17, 100, 960, 2000];
        let fresh: &[(u64, &[usize])] = &[
            (0, SIZES),
            (42, SIZES),
            (1234567890123, &[17, 960]),
            (u64::MAX, &[5, 100]),
        ];
        let mut pos = 0;
        let mut check = |label: String, got: Vec<f32>| {
            let exp = &want[pos..pos + got.len()];
            for (i, (g, e)) in got.iter().zip(exp).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    *e,
                    "{label}: element {i}: got {g:e}, torch {:e}",
                    f32::from_bits(*e)
                );
            }
            pos += got.len();
        };
        for &(seed, sizes) in fresh {
            for &n in sizes {
                check(format!("seed {seed} randn({n})"), TorchGenerator::manual_seed(seed).randn(n));
            }
        }
        let mut g = TorchGenerator::manual_seed(7);
        for (k, n) in [5usize, 16, 1, 1, 17, 2, 3, 33].into_iter().enumerate() {
            check(format!("seed 7 call {k} randn({n})"), g.randn(n));
        }
        assert_eq!(pos, want.len(), "fixture has values the test did not check");
    }

    /// FNV-1a 64 of the little-endian bytes of all values (covers every element
    /// of latent-sized draws; printed by gen_torch_randn_fixtures.py).
    #[test]
    fn large_draws_hash_to_torch_values() {
        let cases: &[(u64, usize, u64)] = &[
            (0, 262144, 0x1ef27ec0ae2db069),
            (42, 262144, 0xb2f5a60dde6ecb89),
            (1234567890123, 262144, 0x1a5ef7e199b8e333),
            (42, 1000003, 0xaa12becaf2d74a5a),
            (3, 17, 0x00db01ca0053c3f3),
            (3, 960, 0x2de6717919ddb5f4),
        ];
        for &(seed, n, h) in cases {
            let v = TorchGenerator::manual_seed(seed).randn(n);
            assert_eq!(fnv1a64(&v), h, "seed {seed} randn({n})");
        }
    }

    /// torch's generic kernel (`ATEN_CPU_CAPABILITY=default`) calls the C
    /// library's logf/sinf/cosf; these hashes were made with glibc.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn generic_kernel_matches_torch_default_capability_on_glibc() {
        let cases: &[(u64, usize, u64)] = &[
            (0, 262144, 0xb37d78779f9625da),
            (42, 262144, 0xe2ff2b8c7a76c190),
            (1234567890123, 262144, 0xe62367ef45fc3f7f),
            (42, 1000003, 0x2ef651251f25b806),
            (3, 17, 0xcd37024cf9c209f1),
            (3, 960, 0x060ad50ac8fa0ea9),
        ];
        for &(seed, n, h) in cases {
            let v = TorchGenerator::manual_seed(seed).with_kernel(NormalKernel::Generic).randn(n);
            assert_eq!(fnv1a64(&v), h, "seed {seed} randn({n})");
        }
    }

    /// A zero uniform in the `u1` half of a block gives radius -0.0; torch's
    /// final `fma(n, 1, 0)` turns the resulting -0.0 into +0.0.
    #[test]
    fn zero_uniform_gives_positive_zero() {
        for kernel in [NormalKernel::Avx2, NormalKernel::Generic] {
            for (seed, i) in [(52372u64, 656usize), (76519, 497)] {
                let v = TorchGenerator::manual_seed(seed).with_kernel(kernel).randn(1024);
                assert_eq!(v[i].to_bits(), 0, "{kernel:?} seed {seed} [{i}]");
                assert_eq!(v[i + 8].to_bits(), 0, "{kernel:?} seed {seed} [{}]", i + 8);
            }
        }
    }

    #[test]
    fn state_carries_across_calls_like_torch() {
        // torch: g = manual_seed(2024); randn(5); randn(960); randn(1)
        let mut g = TorchGenerator::manual_seed(2024);
        assert_eq!(bits(&g.randn(5)), [0xbd25990e, 0x3fdced4f, 0xbf5064d8, 0x3fafa328, 0x3f0186e9]);
        let b = bits(&g.randn(16 * 6 * 10));
        assert_eq!(&b[..4], [0x3ef542c3, 0x3fa810d1, 0xbf949e77, 0xbee29cbb]);
        assert_eq!(&b[b.len() - 4..], [0xbfb52593, 0x3f4f9bfb, 0xbf909a2c, 0xbed70216]);
        // The sine cached by the 5-value scalar draw survives the block draw.
        assert_eq!(bits(&g.randn(1)), [0xbef6f4ed]);

        // Scalar draws one at a time equal one scalar draw of the same length.
        let whole = TorchGenerator::manual_seed(9).randn(7);
        let mut g = TorchGenerator::manual_seed(9);
        let parts: Vec<f32> = (0..7).flat_map(|_| g.randn(1)).collect();
        assert_eq!(bits(&whole), bits(&parts));
    }

    #[test]
    fn block_draw_consumes_numel_plus_16_words_when_ragged() {
        let mut a = TorchGenerator::manual_seed(11);
        a.randn(17);
        let mut b = TorchGenerator::manual_seed(11);
        for _ in 0..33 {
            b.random();
        }
        assert_eq!(a.random(), b.random());
        let mut a = TorchGenerator::manual_seed(11);
        a.randn(32);
        let mut b = TorchGenerator::manual_seed(11);
        for _ in 0..32 {
            b.random();
        }
        assert_eq!(a.random(), b.random());
    }

    #[test]
    fn randn_into_equals_randn_and_empty_is_fine() {
        let v = TorchGenerator::manual_seed(5).randn(333);
        let mut w = vec![0.0; 333];
        TorchGenerator::manual_seed(5).randn_into(&mut w);
        assert_eq!(bits(&v), bits(&w));
        let mut g = TorchGenerator::manual_seed(5);
        assert!(g.randn(0).is_empty());
        assert_eq!(bits(&g.randn(3)), bits(&TorchGenerator::manual_seed(5).randn(3)));
    }

    #[test]
    fn random_seed_varies() {
        let a = random_seed();
        let b = random_seed();
        let c = random_seed();
        assert!(a != b || b != c);
    }
}
