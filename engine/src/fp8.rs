//! 8-bit float weights: decoding the two safetensors fp8 formats, encoding
//! (for tests and converters), and how much memory a checkpoint needs in each
//! way it can be held.
//!
//! ComfyUI ships "fp8" checkpoints in two conventions, both read here:
//! - plain `F8_E4M3` (`torch.float8_e4m3fn`) weights: the value is the fp8
//!   number itself;
//! - *scaled* fp8: each quantised `<layer>.weight` has a per-tensor f32 scale,
//!   `<layer>.scale_weight` in the legacy `scaled_fp8` files (which also carry
//!   a `scaled_fp8` marker tensor and optional `<layer>.scale_input`), or
//!   `<layer>.weight_scale` in the newer mixed-precision files (with a
//!   `<layer>.comfy_quant` JSON byte tensor). The real value is
//!   `fp8 × scale` (ComfyUI's `TensorCoreFP8Layout.dequantize`).
//!
//! The engine dequantises on load, to the compute dtype (see
//! [`crate::weights::TensorStore::read_f32`]): burn 0.21 has no fp8 tensor
//! type, so no backend here can keep weights in fp8. [`MemoryEstimate`] still
//! reports what keeping them would need, for comparison.

use serde::Serialize;

/// Decodes one `float8_e4m3fn` byte: 1 sign, 4 exponent (bias 7), 3 mantissa
/// bits; no infinities, `S.1111.111` is NaN, largest finite value ±448.
pub fn e4m3fn_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((byte >> 3) & 0x0F) as i32;
    let mant = (byte & 0x07) as f32;
    if exp == 0x0F && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // Subnormal: 0.mmm × 2^(1-7).
        return sign * mant / 8.0 * 2f32.powi(-6);
    }
    sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
}

/// Decodes one `float8_e5m2` byte: IEEE-like, 5 exponent bits (bias 15),
/// 2 mantissa bits, with infinities and NaNs.
pub fn e5m2_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((byte >> 2) & 0x1F) as i32;
    let mant = (byte & 0x03) as f32;
    if exp == 0x1F {
        return if mant == 0.0 { sign * f32::INFINITY } else { f32::NAN };
    }
    if exp == 0 {
        return sign * mant / 4.0 * 2f32.powi(-14);
    }
    sign * (1.0 + mant / 4.0) * 2f32.powi(exp - 15)
}

/// Largest finite `float8_e4m3fn` value.
pub const E4M3FN_MAX: f32 = 448.0;

/// Encodes an f32 as `float8_e4m3fn`, rounding to nearest (ties to even) and
/// saturating at ±448, as quantisers clamp before casting (ComfyUI does).
/// NaN maps to NaN (0x7F).
pub fn f32_to_e4m3fn(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if value.is_sign_negative() { 0x80 } else { 0 };
    let a = value.abs().min(E4M3FN_MAX);
    // Choose between the two nearest representable magnitudes: all 127
    // finite non-negative codes are ordered by value, so a search is exact.
    let mut lo = 0u8;
    let mut hi = 0x7Eu8;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if e4m3fn_to_f32(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (vlo, vhi) = (e4m3fn_to_f32(lo), e4m3fn_to_f32(hi));
    let code = if a <= vlo {
        lo
    } else if a >= vhi {
        hi
    } else {
        let (dlo, dhi) = (a - vlo, vhi - a);
        if dlo < dhi || (dlo == dhi && lo & 1 == 0) {
            lo
        } else {
            hi
        }
    };
    sign | code
}

/// Memory a model's weights need, by how they are held. Auxiliary tensors
/// (scales, markers, `comfy_quant` configs) are not weights and only count
/// where they are kept (fp8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Number of weight values.
    pub params: u64,
    /// How many weight tensors are stored in fp8.
    pub fp8_tensors: u64,
    /// Bytes of the weights as stored in the files.
    pub stored_bytes: u64,
    /// fp8 tensors kept in fp8 (plus their f32 scales), everything else in
    /// bf16: what a backend with fp8 storage would need. Equals `bf16_bytes`
    /// when nothing is fp8.
    pub fp8_kept_bytes: u64,
    /// Everything dequantised to bf16 (the GPU default).
    pub bf16_bytes: u64,
    /// Everything dequantised to f32 (the CPU default).
    pub f32_bytes: u64,
}

impl MemoryEstimate {
    /// Adds one weight tensor of `numel` values stored `stored_bytes` wide.
    pub fn add_weight(&mut self, numel: u64, stored_bytes: u64, is_fp8: bool, has_scale: bool) {
        self.params += numel;
        self.stored_bytes += stored_bytes;
        self.bf16_bytes += numel * 2;
        self.f32_bytes += numel * 4;
        if is_fp8 {
            self.fp8_tensors += 1;
            self.fp8_kept_bytes += numel + if has_scale { 4 } else { 0 };
        } else {
            self.fp8_kept_bytes += numel * 2;
        }
    }

    /// One line for reports: `6.15G params: fp8 6.2 GB, bf16 12.3 GB, f32 24.6 GB`.
    pub fn summary(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        if self.fp8_tensors > 0 {
            format!(
                "{:.2}G params ({} fp8 tensors): {:.2} GB kept in fp8, {:.2} GB as bf16, {:.2} GB as f32",
                self.params as f64 / 1e9,
                self.fp8_tensors,
                gb(self.fp8_kept_bytes),
                gb(self.bf16_bytes),
                gb(self.f32_bytes)
            )
        } else {
            format!(
                "{:.2}G params: {:.2} GB as bf16, {:.2} GB as f32",
                self.params as f64 / 1e9,
                gb(self.bf16_bytes),
                gb(self.f32_bytes)
            )
        }
    }
}

/// Whether a tensor name is fp8 bookkeeping rather than a weight: scales,
/// the `scaled_fp8` marker, ComfyUI's per-layer `comfy_quant` configs.
pub fn is_quant_aux(name: &str) -> bool {
    name == "scaled_fp8"
        || name.ends_with(".scaled_fp8")
        || [".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Keys that may hold the per-tensor scale of `weight_key` (`<layer>.weight`):
/// the legacy `scale_weight` first, then the mixed-precision `weight_scale`.
pub fn scale_keys(weight_key: &str) -> Option<[String; 2]> {
    let layer = weight_key.strip_suffix(".weight")?;
    Some([format!("{layer}.scale_weight"), format!("{layer}.weight_scale")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3fn_bit_patterns_decode_exactly() {
        assert_eq!(e4m3fn_to_f32(0x00), 0.0);
        assert!(e4m3fn_to_f32(0x80).is_sign_negative() && e4m3fn_to_f32(0x80) == 0.0);
        assert_eq!(e4m3fn_to_f32(0x38), 1.0); // exp 7, mant 0
        assert_eq!(e4m3fn_to_f32(0xB8), -1.0);
        assert_eq!(e4m3fn_to_f32(0x3C), 1.5);
        assert_eq!(e4m3fn_to_f32(0x7E), 448.0); // max finite: 1.75 × 2^8
        assert_eq!(e4m3fn_to_f32(0xFE), -448.0);
        assert!(e4m3fn_to_f32(0x7F).is_nan());
        assert!(e4m3fn_to_f32(0xFF).is_nan());
        // exp 15 with mantissa < 7 is a normal number, not inf/NaN.
        assert_eq!(e4m3fn_to_f32(0x78), 256.0);
        // Subnormals: m/8 × 2^-6; smallest 2^-9.
        assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3fn_to_f32(0x07), 7.0 / 8.0 * 2f32.powi(-6));
        assert_eq!(e4m3fn_to_f32(0x81), -(2f32.powi(-9)));
        // Smallest normal 2^-6.
        assert_eq!(e4m3fn_to_f32(0x08), 2f32.powi(-6));
        // Ordered: every finite positive code is larger than the previous.
        for c in 1..=0x7Eu8 {
            assert!(e4m3fn_to_f32(c) > e4m3fn_to_f32(c - 1), "code {c:#x}");
        }
    }

    #[test]
    fn e5m2_bit_patterns_decode_exactly() {
        assert_eq!(e5m2_to_f32(0x3C), 1.0);
        assert_eq!(e5m2_to_f32(0x7B), 57344.0);
        assert_eq!(e5m2_to_f32(0x7C), f32::INFINITY);
        assert_eq!(e5m2_to_f32(0xFC), f32::NEG_INFINITY);
        assert!(e5m2_to_f32(0x7D).is_nan());
        assert_eq!(e5m2_to_f32(0x01), 2f32.powi(-16));
        // e5m2 is the top byte of an f16: compare every code with half.
        for c in 0..=255u8 {
            let h = half::f16::from_bits((c as u16) << 8).to_f32();
            let ours = e5m2_to_f32(c);
            assert!(ours == h || (ours.is_nan() && h.is_nan()), "code {c:#x}: {ours} vs {h}");
        }
    }

    #[test]
    fn e4m3fn_encoding_round_trips_and_rounds_to_nearest_even() {
        for c in 0..=0xFEu8 {
            if c == 0x7F {
                continue;
            }
            let v = e4m3fn_to_f32(c);
            let back = f32_to_e4m3fn(v);
            // +0 and -0 keep their sign bit.
            assert_eq!(back, c, "code {c:#x} value {v}");
        }
        assert_eq!(f32_to_e4m3fn(1000.0), 0x7E, "saturates at 448");
        assert_eq!(f32_to_e4m3fn(-1e30), 0xFE);
        assert_eq!(f32_to_e4m3fn(f32::NAN), 0x7F);
        // 1.0625 is halfway between 1.0 (0x38, even) and 1.125 (0x39): ties to even.
        assert_eq!(f32_to_e4m3fn(1.0625), 0x38);
        // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3A, even).
        assert_eq!(f32_to_e4m3fn(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3fn(1.07), 0x39);
        // Below half the smallest subnormal rounds to zero.
        assert_eq!(f32_to_e4m3fn(2f32.powi(-11)), 0x00);
    }

    #[test]
    fn memory_estimate_counts_each_choice() {
        let mut m = MemoryEstimate::default();
        m.add_weight(1000, 1000, true, true);
        m.add_weight(10, 20, false, false);
        assert_eq!(m.params, 1010);
        assert_eq!(m.fp8_tensors, 1);
        assert_eq!(m.stored_bytes, 1020);
        assert_eq!(m.fp8_kept_bytes, 1000 + 4 + 20);
        assert_eq!(m.bf16_bytes, 2020);
        assert_eq!(m.f32_bytes, 4040);
        assert!(m.summary().contains("1 fp8 tensors"), "{}", m.summary());
    }

    #[test]
    fn quant_aux_names() {
        assert!(is_quant_aux("scaled_fp8"));
        assert!(is_quant_aux("model.diffusion_model.scaled_fp8"));
        assert!(is_quant_aux("layers.0.attention.qkv.scale_weight"));
        assert!(is_quant_aux("layers.0.attention.qkv.comfy_quant"));
        assert!(!is_quant_aux("layers.0.attention.qkv.weight"));
        assert_eq!(
            scale_keys("a.qkv.weight").unwrap(),
            ["a.qkv.scale_weight".to_string(), "a.qkv.weight_scale".to_string()]
        );
        assert!(scale_keys("x_pad_token").is_none());
    }
}
