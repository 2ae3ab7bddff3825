//! The FLUX.1-style 16-channel `AutoencoderKL` (spec §5): a decoder from
//! latents to RGB and an encoder for img2img. GroupNorm statistics in f32.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use crate::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};

use crate::error::Result;
use crate::nn::{join, linear, sdpa};
use crate::weights::{Init, RandomWeights, WeightSource};

/// Configuration of the autoencoder, as in `vae/config.json`.
#[derive(Config, Debug)]
pub struct VaeConfig {
    /// Image channels.
    #[config(default = 3)]
    pub in_channels: usize,
    /// Latent channels.
    #[config(default = 16)]
    pub latent_channels: usize,
    /// Channels of each resolution level, finest first.
    #[config(default = "vec![128, 256, 512, 512]")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[config(default = 2)]
    pub layers_per_block: usize,
    /// GroupNorm groups.
    #[config(default = 32)]
    pub norm_num_groups: usize,
    /// Model-space latents are `(z − shift) · scaling`.
    #[config(default = 0.3611)]
    pub scaling_factor: f64,
    /// See `scaling_factor`.
    #[config(default = 0.1159)]
    pub shift_factor: f64,
}

impl VaeConfig {
    /// Reads a diffusers `vae/config.json`.
    pub fn from_diffusers_json(json: &serde_json::Value) -> std::result::Result<Self, String> {
        let int = |k: &str, d: usize| json.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(d);
        let blocks: Vec<usize> = match json.get("block_out_channels") {
            None => vec![128, 256, 512, 512],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or("\"block_out_channels\" must be a list of integers")?,
        };
        for flag in ["use_quant_conv", "use_post_quant_conv"] {
            if json.get(flag).and_then(|v| v.as_bool()) == Some(true) {
                return Err(format!("{flag}=true is not supported (Z-Image's VAE has none)"));
            }
        }
        let groups = int("norm_num_groups", 32);
        if blocks.is_empty() || groups == 0 || blocks.iter().any(|c| c % groups != 0) {
            return Err(format!(
                "block_out_channels {blocks:?} must be non-empty multiples of norm_num_groups {groups}"
            ));
        }
        Ok(VaeConfig::new()
            .with_in_channels(int("in_channels", 3))
            .with_latent_channels(int("latent_channels", 16))
            .with_block_out_channels(blocks)
            .with_layers_per_block(int("layers_per_block", 2))
            .with_norm_num_groups(groups)
            .with_scaling_factor(json.get("scaling_factor").and_then(|v| v.as_f64()).unwrap_or(0.3611))
            .with_shift_factor(json.get("shift_factor").and_then(|v| v.as_f64()).unwrap_or(0.1159)))
    }

    /// Pixels per latent cell along each side (8 for the real model).
    pub fn scale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// [`Vae::decode_working_bytes`] from the config alone (before loading).
    pub fn decode_working_bytes(&self, h: usize, w: usize) -> u64 {
        let levels = self.block_out_channels.len();
        let channels = self.block_out_channels.iter().rev().enumerate().map(|(i, &c)| (c as u64, i + 1 < levels));
        decode_working_bytes(channels, h, w)
    }

    /// A model with fresh random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vae<B> {
        Vae::build(self, &mut RandomWeights::new(device, DType::F32), true).expect("random init cannot fail")
    }
}

const GN_EPS: f64 = 1e-6;

/// The largest tensor, in bytes, that [`Vae::decode`] and [`Vae::encode`]
/// hold in one piece.
/// Why: at 1024² the decoder's top levels hold 0.5–1.07 GB activations, and
/// cubecl's CUDA pools give any allocation between 312 MB and 2.5 GB a page
/// of its own kind, 5 GB on an 80 GB card, kept until cleanup (see
/// docs/performance.md, "Session 11"). Bands of at most 128 MiB (counted in
/// f32, the GroupNorm's working copy), halo rows included, stay in the
/// pools of 312 MB slices and under.
pub const DECODE_TENSOR_LIMIT_BYTES: u64 = 128 << 20;

/// GroupNorm with affine weight and bias; statistics in f32.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    pub weight: burn::module::Param<Tensor<B, 1>>,
    pub bias: burn::module::Param<Tensor<B, 1>>,
    pub groups: usize,
}

impl<B: Backend> GroupNorm<B> {
    fn build<S: WeightSource<B>>(src: &mut S, name: &str, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            weight: src.param(&join(name, "weight"), [channels], Init::Ones)?,
            bias: src.param(&join(name, "bias"), [channels], Init::Zeros)?,
            groups,
        })
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if crate::fused::enabled::<B>(x.dtype()) {
            return crate::fused::group_norm(x, self.groups, self.weight.val(), self.bias.val(), GN_EPS, false);
        }
        if let Some(y) = self.forward_gpu(&x, false) {
            return y;
        }
        self.forward_composed(x)
    }

    /// `silu(norm(x))`, the pair every VAE block applies.
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if crate::fused::enabled::<B>(x.dtype()) {
            return crate::fused::group_norm(x, self.groups, self.weight.val(), self.bias.val(), GN_EPS, true);
        }
        if let Some(y) = self.forward_gpu(&x, true) {
            return y;
        }
        silu(self.forward_composed(x))
    }

    /// The same through the GPU kernels of `cube_kernels` (`None` where they
    /// do not run): three reads of `x` and one write, against burn's dozen
    /// passes in f32 (6.9 ms at `[1, 128, 1024, 1024]` on the H100).
    fn forward_gpu(&self, x: &Tensor<B, 4>, silu: bool) -> Option<Tensor<B, 4>> {
        let (scale, shift) = self.band_affine_gpu(std::slice::from_ref(x))?;
        crate::cube_kernels::plane_affine(x, &scale, &shift, silu)
    }

    /// The same with burn's tensor ops (every backend but CPU f32).
    pub fn forward_composed(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let dtype = x.dtype();
        let x32 = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
        let g = x32.reshape([b, self.groups, (c / self.groups) * h * w]);
        let mean = mean_last(g.clone());
        let centered = g - mean;
        let var = mean_last(centered.clone().square());
        let y = (centered / (var + GN_EPS).sqrt()).reshape([b, c, h, w]);
        let y = if dtype == DType::F32 { y } else { y.cast(dtype) };
        // As [B·C, H·W] rows with one (weight, bias) pair per row: a per-row
        // scalar broadcast, which every backend (flex included) does fast.
        let per_row = |p: Tensor<B, 1>| p.unsqueeze::<2>().repeat_dim(0, b).reshape([b * c, 1]);
        let y = y.reshape([b * c, h * w]) * per_row(self.weight.val()) + per_row(self.bias.val());
        y.reshape([b, c, h, w])
    }

    /// The per-(item, channel) `(scale, shift)`, `[B·C, 1]` in f32, that
    /// normalise the whole tensor whose row bands are `bands`: `norm(x) = x ·
    /// scale + shift`. Two passes as in [`Self::forward_composed`] (the mean,
    /// then the mean squared deviation from it), each a row-weighted mean of
    /// the bands' own, so the statistics are the whole tensor's.
    fn band_affine(&self, bands: &[Tensor<B, 4>]) -> (Tensor<B, 2>, Tensor<B, 2>) {
        if crate::fused::enabled::<B>(bands[0].dtype()) {
            return self.band_affine_fused(bands);
        }
        if let Some(affine) = self.band_affine_gpu(bands) {
            return affine;
        }
        self.band_affine_composed(bands)
    }

    /// [`Self::band_affine`] through the GPU kernels (`None` where they do not
    /// run): per-band sums, then the same arithmetic as the composed form.
    fn band_affine_gpu(&self, bands: &[Tensor<B, 4>]) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        let [b, c, _, w] = bands[0].dims();
        let g = self.groups;
        let count = ((c / g) * w * bands.iter().map(|t| t.dims()[2]).sum::<usize>()) as f64;
        let total = |centres: &Tensor<B, 1>, squared: bool| -> Option<Tensor<B, 1>> {
            let mut sum: Option<Tensor<B, 1>> = None;
            for t in bands {
                let s = crate::cube_kernels::group_sums(t, g, centres, squared)?;
                sum = Some(match sum {
                    None => s,
                    Some(acc) => acc + s,
                });
            }
            sum
        };
        let zeros = Tensor::<B, 1>::zeros([b * g], (&bands[0].device(), DType::F32));
        let mean = total(&zeros, false)? / count;
        let var = total(&mean, true)? / count;
        Some(self.affine_from_stats(mean.reshape([b, g, 1]), var.reshape([b, g, 1]), b, c))
    }

    /// The per-(item, channel) `(scale, shift)`, `[B·C, 1]` in f32, from each
    /// (item, group)'s mean and variance (`[B, G, 1]`, f32).
    fn affine_from_stats(&self, mean: Tensor<B, 3>, var: Tensor<B, 3>, b: usize, c: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let g = self.groups;
        let f32 = |t: Tensor<B, 1>| if t.dtype() == DType::F32 { t } else { t.cast(DType::F32) };
        // [B, G, 1] → [B·C, 1]: each group's value for its C/G channels.
        let per_channel = |t: Tensor<B, 3>| t.repeat_dim(2, c / g).reshape([b * c, 1]);
        let per_row = |p: Tensor<B, 1>| f32(p).unsqueeze::<2>().repeat_dim(0, b).reshape([b * c, 1]);
        let scale = per_channel((var + GN_EPS).sqrt().recip()) * per_row(self.weight.val());
        let shift = per_row(self.bias.val()) - per_channel(mean) * scale.clone();
        (scale, shift)
    }

    /// [`Self::band_affine`] with burn's tensor ops (every backend but CPU f32).
    fn band_affine_composed(&self, bands: &[Tensor<B, 4>]) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [b, c, _, w] = bands[0].dims();
        let g = self.groups;
        let rows: usize = bands.iter().map(|t| t.dims()[2]).sum();
        let grouped = |t: &Tensor<B, 4>| {
            let h = t.dims()[2];
            let x = if t.dtype() == DType::F32 { t.clone() } else { t.clone().cast(DType::F32) };
            (x.reshape([b, g, (c / g) * h * w]), h as f64 / rows as f64)
        };
        let weighted_mean = |f: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>| {
            let parts = bands.iter().map(|t| {
                let (x, share) = grouped(t);
                mean_last(f(x)) * share
            });
            parts.reduce(|a, p| a + p).expect("at least one band")
        };
        let mean = weighted_mean(&|x| x);
        let var = weighted_mean(&|x| (x - mean.clone()).square());
        self.affine_from_stats(mean, var, b, c)
    }

    /// [`Self::band_affine`] on the CPU: the fused GroupNorm's own passes
    /// (flex runs the composed reductions on one core).
    fn band_affine_fused(&self, bands: &[Tensor<B, 4>]) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [b, c, _, w] = bands[0].dims();
        let per_group = c / self.groups;
        let count = (per_group * w * bands.iter().map(|t| t.dims()[2]).sum::<usize>()) as f64;
        let total = |centres: Option<&[f32]>| {
            let sums = bands.iter().map(|t| crate::fused::group_sums(t.clone(), self.groups, centres));
            sums.reduce(|a, s| a.iter().zip(&s).map(|(x, y)| x + y).collect()).expect("at least one band")
        };
        let means: Vec<f32> = total(None).iter().map(|s| (s / count) as f32).collect();
        let inv: Vec<f32> = total(Some(&means)).iter().map(|s| 1.0 / ((s / count) as f32 + GN_EPS as f32).sqrt()).collect();
        let host = |p: Tensor<B, 1>| p.into_data().to_vec::<f32>().expect("f32 parameters on the CPU");
        let (weight, bias) = (host(self.weight.val()), host(self.bias.val()));
        let (mut scale, mut shift) = (Vec::with_capacity(b * c), Vec::with_capacity(b * c));
        for i in 0..b * c {
            let (group, channel) = (i / per_group, i % c);
            scale.push(weight[channel] * inv[group]);
            shift.push(bias[channel] - means[group] * weight[channel] * inv[group]);
        }
        let device = bands[0].device();
        let column = |v: Vec<f32>| Tensor::from_data(burn::tensor::TensorData::new(v, [b * c, 1]), &device);
        (column(scale), column(shift))
    }
}

/// Applies a [`GroupNorm::band_affine`] to one band (or its halo-extended
/// copy), then SiLU: `[B, C, h, W]` → the same. On the CPU in one pass
/// (flex's own SiLU calls a scalar `expf` per element).
fn affine_silu<B: Backend>(x: Tensor<B, 4>, scale: &Tensor<B, 2>, shift: &Tensor<B, 2>) -> Tensor<B, 4> {
    if crate::fused::enabled::<B>(x.dtype()) {
        return crate::fused::plane_affine_silu(x, scale.clone(), shift.clone());
    }
    if let Some(y) = crate::cube_kernels::plane_affine(&x, scale, shift, true) {
        return y;
    }
    affine_silu_composed(x, scale, shift)
}

fn affine_silu_composed<B: Backend>(x: Tensor<B, 4>, scale: &Tensor<B, 2>, shift: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
    let y = (x32.reshape([b * c, h * w]) * scale.clone() + shift.clone()).reshape([b, c, h, w]);
    silu(if dtype == DType::F32 { y } else { y.cast(dtype) })
}

/// A `[B, C, H, W]` activation held as bands of rows, top to bottom, so that
/// no single allocation exceeds a byte limit (see
/// [`DECODE_TENSOR_LIMIT_BYTES`]). The ops on it give the whole tensor's
/// values: a 3×3 convolution sees its neighbours' edge rows (the halo),
/// GroupNorm takes its statistics over all bands. With one band every op is
/// the plain one.
struct RowBands<B: Backend> {
    bands: Vec<Tensor<B, 4>>,
}

impl<B: Backend> RowBands<B> {
    fn whole(x: Tensor<B, 4>) -> Self {
        Self { bands: vec![x] }
    }

    /// Splits every band whose rows, with two halo rows, hold more than
    /// `limit` bytes into about equal bands that do not, each a multiple of
    /// `align` rows (but the last; `align` rows at the least).
    fn split(self, limit: u64, align: usize) -> Self {
        let mut bands = Vec::with_capacity(self.bands.len());
        for band in self.bands {
            let [b, c, h, w] = band.dims();
            // GroupNorm works on an f32 copy: a bf16 band's rows count at 4 bytes.
            let row_bytes = ((b * c * w * band.dtype().size().max(4)) as u64).max(1);
            let units = h / align;
            if h as u64 * row_bytes <= limit || units <= 1 {
                bands.push(band);
                continue;
            }
            let units_per_band = ((limit / row_bytes).saturating_sub(2) as usize / align).max(1);
            let n = units.div_ceil(units_per_band);
            let mut start = 0;
            for i in 0..n {
                let len = if i + 1 == n { h - start } else { align * (units / n + usize::from(i < units % n)) };
                bands.push(crate::fused::contiguous(band.clone().narrow(2, start, len)));
                start += len;
            }
        }
        Self { bands }
    }

    /// `prepare` then `conv` (3×3, padding 1) on each band with one row of
    /// each neighbour above and below; the halo rows' outputs are dropped.
    /// `prepare` acts on each row alone (an affine map, an activation) or
    /// repeats each row `stretch` times (the nearest ×2 upsampling, with
    /// `stretch` 2), so the whole upsampled tensor never exists at once.
    fn conv3x3(&self, conv: &Conv2d<B>, stretch: usize, prepare: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) -> Self {
        let n = self.bands.len();
        if n == 1 {
            return Self::whole(apply_conv(conv, prepare(self.bands[0].clone())));
        }
        let bands = (0..n)
            .map(|i| {
                let band = &self.bands[i];
                let h = band.dims()[2];
                let mut parts = Vec::with_capacity(3);
                if i > 0 {
                    let above = &self.bands[i - 1];
                    parts.push(above.clone().narrow(2, above.dims()[2] - 1, 1));
                }
                parts.push(band.clone());
                if i + 1 < n {
                    parts.push(self.bands[i + 1].clone().narrow(2, 0, 1));
                }
                // The neighbours' rows, stretched, are only read by the band's
                // edge outputs; their own outputs are dropped.
                let y = apply_conv(conv, prepare(Tensor::cat(parts, 2)));
                // Contiguous on the CPU, where every later op would walk a view element by element.
                crate::fused::contiguous(y.narrow(2, if i > 0 { stretch } else { 0 }, stretch * h))
            })
            .collect();
        Self { bands }
    }

    /// The encoder's downsampling (pad bottom and right by one, then 3×3
    /// stride 2) on each band with the first row of the band below; bands of
    /// even length (but the last) give half as many rows each.
    fn downsample(&self, conv: &Conv2d<B>) -> Self {
        let n = self.bands.len();
        let bands = (0..n).map(|i| {
            let band = self.bands[i].clone();
            if i + 1 == n {
                return apply_conv(conv, band); // the conv's own padding is the bottom edge's
            }
            // An even band, the row below it and the conv's own zero row under
            // that: exactly half the band's rows out, the last reading the row below.
            let below = self.bands[i + 1].clone().narrow(2, 0, 1);
            apply_conv(conv, Tensor::cat(vec![band, below], 2))
        });
        Self { bands: bands.collect() }
    }

    /// `conv(silu(norm(x)))`, the pair every decoder block applies.
    fn norm_silu_conv(&self, norm: &GroupNorm<B>, conv: &Conv2d<B>) -> Self {
        if self.bands.len() == 1 {
            return self.conv3x3(conv, 1, |x| norm.forward_silu(x));
        }
        let (scale, shift) = norm.band_affine(&self.bands);
        self.conv3x3(conv, 1, |x| affine_silu(x, &scale, &shift))
    }

    /// The bands joined again: `[B, C, H, W]`.
    fn join(mut self) -> Tensor<B, 4> {
        if self.bands.len() == 1 {
            return self.bands.remove(0);
        }
        Tensor::cat(self.bands, 2)
    }
}

/// Peak f32 working memory, bytes, of decoding `h`×`w` latent cells through
/// up blocks of `(channels, upsamples)`, coarsest first: an upper estimate.
/// The largest activation is a level's output upsampled ×2. Whole tensors
/// hold about four of it at once (input, GroupNorm output, conv output,
/// residual) and the attention's `(h·w)²` scores; in row bands two (the block's
/// input and output) and a few bands. Measured peaks above the weights
/// (`zimage bench-vae --config full`, CPU): 1024², whole 3.5 GiB against 5.0
/// estimated, bands 2.2 GiB against 2.5.
pub fn decode_working_bytes(levels: impl Iterator<Item = (u64, bool)>, h: usize, w: usize) -> u64 {
    let mut side = 1u64; // pixels per latent cell at the current level
    let mut largest = 0u64;
    for (channels, upsamples) in levels {
        let cells = (h * w) as u64 * side * side;
        largest = largest.max(channels * cells);
        if upsamples {
            side *= 2;
            largest = largest.max(channels * cells * 4);
        }
    }
    let scores = ((h * w) as u64).pow(2);
    let whole = 4 * (4 * largest) + 4 * scores;
    let banded = 4 * (2 * largest) + 4 * DECODE_TENSOR_LIMIT_BYTES;
    whole.min(banded)
}

/// Mean over the last dimension, `[b, g, n]` → `[b, g, 1]`, as a mean of
/// equal chunks' means where the rows are few and long. Why: GPU reductions
/// spread over rows, and a GroupNorm has `b·32` rows of up to millions of
/// values at 1024², which leaves most of the chip idle.
pub(crate) fn mean_last<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, g, n] = x.dims();
    match (256..=4096).rev().find(|chunk| n % chunk == 0 && n / chunk >= 2) {
        Some(chunk) => x.reshape([b, g * (n / chunk), chunk]).mean_dim(2).reshape([b, g, n / chunk]).mean_dim(2),
        None => x.mean_dim(2),
    }
}

/// `conv(x)`, through the CPU's fused 3×3 kernel where it applies (stride 1,
/// padding 1: every VAE conv but the 1×1 shortcuts and the encoder's
/// downsampling), the implicit-GEMM kernel on CUDA (see
/// [`crate::cuda_kernels`]), its training form with a GEMM weight gradient
/// under autodiff on the CPU ([`crate::fused::conv3x3_autodiff`]), burn's conv
/// everywhere else.
fn apply_conv<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let same_3x3 = conv.kernel_size == [3, 3]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && matches!(conv.padding, PaddingConfig2d::Explicit(1, 1, 1, 1));
    if let Some(y) = training_conv(conv, &x) {
        return y;
    }
    if same_3x3 && crate::fused::enabled::<B>(x.dtype()) && conv.weight.dtype() == DType::F32 {
        return crate::fused::conv3x3(x, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
    }
    let padding = match conv.padding {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && t == b && t == r => Some(t),
        _ => None,
    };
    if let Some(p) = padding {
        let options = ConvOptions::new(conv.stride, [p, p], conv.dilation, conv.groups);
        let bias = conv.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::cuda_kernels::conv2d(&x, &conv.weight.val(), bias.as_ref(), options) {
            return y;
        }
    }
    conv.forward(x)
}

/// The VAE's convolutions under autodiff on the CPU (training), in forms
/// whose weight gradients are GEMMs: burn's default weight gradient is a
/// convolution whose kernel is the whole output gradient, which flex runs
/// element by element (perf: ~57 % of a decoder training step). 3×3 with
/// padding 1: [`crate::fused::conv3x3_autodiff`]; the encoder's downsampling
/// (pad right and bottom by 1, 3×3, stride 2): the same convolution at every
/// position, odd rows and columns kept (`out[i, j] = y[2i + 1, 2j + 1]`);
/// 1×1: a batched matmul. `None` elsewhere (inference, other backends).
fn training_conv<B: Backend>(conv: &Conv2d<B>, x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    if !(crate::fused::on_flex::<B>() && B::ad_enabled(&x.device()) && conv.dilation == [1, 1] && conv.groups == 1) {
        return None;
    }
    let bias = conv.bias.as_ref()?.val();
    let weight = conv.weight.val();
    match (conv.kernel_size, conv.stride, &conv.padding) {
        ([3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1)) => crate::fused::conv3x3_autodiff(x, &weight, &bias),
        ([3, 3], [2, 2], PaddingConfig2d::Explicit(0, 0, 1, 1)) => {
            use burn::tensor::Slice;
            let y = crate::fused::conv3x3_autodiff(x, &weight, &bias)?;
            let [b, c, h, w] = y.dims();
            let odd = |n: usize| Slice::new(1, Some(n as isize), 2);
            Some(y.slice([Slice::from(0..b), Slice::from(0..c), odd(h), odd(w)]))
        }
        ([1, 1], [1, 1], PaddingConfig2d::Valid) => {
            let [b, c, h, w] = x.dims();
            let o = weight.dims()[0];
            let y = weight.reshape([1, o, c]).repeat_dim(0, b).matmul(x.clone().reshape([b, c, h * w]));
            // The bias repeated to full size: flex adds a `[1, O, 1]` operand element by element.
            Some((y + bias.reshape([1, o, 1]).repeat_dim(0, b).repeat_dim(2, h * w)).reshape([b, o, h, w]))
        }
        _ => None,
    }
}

/// A PyTorch `Conv2d` (weight `[out, in, k, k]`, bias) under `name`.
fn conv<B: Backend, S: WeightSource<B>>(
    src: &mut S,
    name: &str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: PaddingConfig2d,
) -> Result<Conv2d<B>> {
    let fan = c_in * k * k;
    Ok(Conv2d {
        weight: src.param(&join(name, "weight"), [c_out, c_in, k, k], Init::FanIn(fan))?,
        bias: Some(src.param(&join(name, "bias"), [c_out], Init::FanIn(fan))?),
        stride: [stride, stride],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups: 1,
        padding,
    })
}

fn conv3<B: Backend, S: WeightSource<B>>(src: &mut S, name: &str, c_in: usize, c_out: usize) -> Result<Conv2d<B>> {
    conv(src, name, c_in, c_out, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1))
}

/// `h = conv1(silu(norm1(x)))`, `h = conv2(silu(norm2(h)))`, `out = shortcut(x) + h`.
#[derive(Module, Debug)]
pub struct ResnetBlock<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    fn build<S: WeightSource<B>>(src: &mut S, p: &str, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::build(src, &join(p, "norm1"), c_in, groups)?,
            conv1: conv3(src, &join(p, "conv1"), c_in, c_out)?,
            norm2: GroupNorm::build(src, &join(p, "norm2"), c_out, groups)?,
            conv2: conv3(src, &join(p, "conv2"), c_out, c_out)?,
            conv_shortcut: if c_in != c_out {
                Some(conv(src, &join(p, "conv_shortcut"), c_in, c_out, 1, 1, PaddingConfig2d::Valid)?)
            } else {
                None
            },
        })
    }

    /// `[B, C_in, H, W]` → `[B, C_out, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_bands(RowBands::whole(x)).join()
    }

    /// The same on row bands; the output keeps the input's bands.
    fn forward_bands(&self, x: RowBands<B>) -> RowBands<B> {
        let h = x.norm_silu_conv(&self.norm1, &self.conv1);
        let h = h.norm_silu_conv(&self.norm2, &self.conv2);
        let bands = x.bands.into_iter().zip(h.bands).map(|(x, h)| match &self.conv_shortcut {
            Some(s) => apply_conv(s, x) + h,
            None => x + h,
        });
        RowBands { bands: bands.collect() }
    }
}

/// Single-head self-attention over all pixels, with a residual.
#[derive(Module, Debug)]
pub struct MidAttention<B: Backend> {
    pub group_norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
}

impl<B: Backend> MidAttention<B> {
    /// `[B, C, H, W]` → `[B, C, H, W]`; the queries go in chunks whose
    /// `[B, chunk, H·W]` scores hold at most `limit` bytes (a backend without
    /// a fused kernel for this head size materialises them: 1.07 GB at 1024²).
    pub fn forward(&self, x: Tensor<B, 4>, limit: u64) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let heads = |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(1);
        let q = heads(self.to_q.forward(tokens.clone()));
        let k = heads(self.to_k.forward(tokens.clone()));
        let v = heads(self.to_v.forward(tokens));
        let s = h * w;
        let chunk = (limit / (b * s * 4).max(1) as u64).clamp(1, s as u64) as usize;
        let o = if chunk >= s {
            sdpa(q, k, v, None, false)
        } else {
            let chunks = (0..s)
                .step_by(chunk)
                .map(|start| sdpa(q.clone().narrow(2, start, chunk.min(s - start)), k.clone(), v.clone(), None, false));
            Tensor::cat(chunks.collect(), 2)
        };
        let o = o.squeeze_dim::<3>(1);
        let o = self.to_out.forward(o).swap_dims(1, 2).reshape([b, c, h, w]);
        x + o
    }
}

/// ResNet, attention, ResNet at the coarsest level.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    pub resnet_1: ResnetBlock<B>,
    pub attention: MidAttention<B>,
    pub resnet_2: ResnetBlock<B>,
}

impl<B: Backend> MidBlock<B> {
    fn build<S: WeightSource<B>>(src: &mut S, p: &str, c: usize, groups: usize) -> Result<Self> {
        let a = join(p, "attentions.0");
        Ok(Self {
            resnet_1: ResnetBlock::build(src, &join(p, "resnets.0"), c, c, groups)?,
            attention: MidAttention {
                group_norm: GroupNorm::build(src, &join(&a, "group_norm"), c, groups)?,
                to_q: linear(src, &join(&a, "to_q"), c, c, true)?,
                to_k: linear(src, &join(&a, "to_k"), c, c, true)?,
                to_v: linear(src, &join(&a, "to_v"), c, c, true)?,
                to_out: linear(src, &join(&a, "to_out.0"), c, c, true)?,
            },
            resnet_2: ResnetBlock::build(src, &join(p, "resnets.1"), c, c, groups)?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`; `limit` as in [`MidAttention::forward`].
    pub fn forward(&self, x: Tensor<B, 4>, limit: u64) -> Tensor<B, 4> {
        self.resnet_2.forward(self.attention.forward(self.resnet_1.forward(x), limit))
    }
}

/// One decoder level: ResNets, then (except the last) nearest ×2 and a conv.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub upsample: Option<Conv2d<B>>,
}

/// One encoder level: ResNets, then (except the last) a stride-2 conv.
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub downsample: Option<Conv2d<B>>,
}

/// Latents `[B, 16, h, w]` (VAE space) → image `[B, 3, 8h, 8w]` in about [−1, 1].
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid: MidBlock<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

/// Image `[B, 3, H, W]` in [−1, 1] → posterior mean and log-variance `[B, 16, H/8, W/8]`.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid: MidBlock<B>,
    pub norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

/// The autoencoder; the encoder is optional (only img2img needs it).
#[derive(Module, Debug)]
pub struct Vae<B: Backend> {
    pub decoder: Decoder<B>,
    pub encoder: Option<Encoder<B>>,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl<B: Backend> Vae<B> {
    /// Peak f32 working memory of decoding one latent of `h`×`w` cells, in
    /// bytes (an upper estimate, used to refuse sizes that cannot fit; see
    /// [`decode_working_bytes`]).
    pub fn decode_working_bytes(&self, h: usize, w: usize) -> u64 {
        let channels = self.decoder.up_blocks.iter().map(|block| {
            let c = block.resnets.last().map(|r| r.conv2.weight.dims()[0]).unwrap_or(0);
            (c as u64, block.upsample.is_some())
        });
        decode_working_bytes(channels, h, w)
    }

    /// Builds from a [`WeightSource`] with the diffusers names.
    pub fn build<S: WeightSource<B>>(c: &VaeConfig, src: &mut S, with_encoder: bool) -> Result<Self> {
        let g = c.norm_num_groups;
        let top = *c.block_out_channels.last().expect("validated non-empty");
        let levels = c.block_out_channels.len();

        let mut up_blocks = Vec::with_capacity(levels);
        let mut prev = top;
        for (i, &out) in c.block_out_channels.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock::build(src, &format!("{p}.resnets.{j}"), if j == 0 { prev } else { out }, out, g))
                .collect::<Result<Vec<_>>>()?;
            let upsample =
                if i + 1 < levels { Some(conv3(src, &format!("{p}.upsamplers.0.conv"), out, out)?) } else { None };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let decoder = Decoder {
            conv_in: conv3(src, "decoder.conv_in", c.latent_channels, top)?,
            mid: MidBlock::build(src, "decoder.mid_block", top, g)?,
            up_blocks,
            norm_out: GroupNorm::build(src, "decoder.conv_norm_out", c.block_out_channels[0], g)?,
            conv_out: conv3(src, "decoder.conv_out", c.block_out_channels[0], c.in_channels)?,
        };

        let encoder = if with_encoder {
            let mut down_blocks = Vec::with_capacity(levels);
            let mut prev = c.block_out_channels[0];
            for (i, &out) in c.block_out_channels.iter().enumerate() {
                let p = format!("encoder.down_blocks.{i}");
                let resnets = (0..c.layers_per_block)
                    .map(|j| {
                        ResnetBlock::build(src, &format!("{p}.resnets.{j}"), if j == 0 { prev } else { out }, out, g)
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Downsample pads (0, 1, 0, 1) then a 3×3 stride-2 conv without padding.
                let downsample = if i + 1 < levels {
                    Some(conv(
                        src,
                        &format!("{p}.downsamplers.0.conv"),
                        out,
                        out,
                        3,
                        2,
                        PaddingConfig2d::Explicit(0, 0, 1, 1),
                    )?)
                } else {
                    None
                };
                down_blocks.push(DownBlock { resnets, downsample });
                prev = out;
            }
            Some(Encoder {
                conv_in: conv3(src, "encoder.conv_in", c.in_channels, c.block_out_channels[0])?,
                down_blocks,
                mid: MidBlock::build(src, "encoder.mid_block", top, g)?,
                norm_out: GroupNorm::build(src, "encoder.conv_norm_out", top, g)?,
                conv_out: conv3(src, "encoder.conv_out", top, 2 * c.latent_channels)?,
            })
        } else {
            None
        };
        Ok(Self { decoder, encoder, scaling_factor: c.scaling_factor, shift_factor: c.shift_factor })
    }

    /// VAE-space latents `[B, 16, h, w]` → image `[B, 3, 8h, 8w]` (unclamped),
    /// no tensor over [`DECODE_TENSOR_LIMIT_BYTES`] held in one piece.
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decode_within(z, DECODE_TENSOR_LIMIT_BYTES)
    }

    /// [`Self::decode`] with the levels whose activations exceed `limit` bytes
    /// run in row bands (`u64::MAX`: whole tensors throughout); the values are
    /// the same either way, up to float summation order.
    pub fn decode_within(&self, z: Tensor<B, 4>, limit: u64) -> Tensor<B, 4> {
        let d = &self.decoder;
        let x = d.mid.forward(apply_conv(&d.conv_in, z), limit);
        let mut x = RowBands::whole(x).split(limit, 1);
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward_bands(x);
            }
            if let Some(up) = &block.upsample {
                // A quarter of the limit before, so each band is within it after ×2.
                x = x.split(limit / 4, 1).conv3x3(up, 2, upsample_nearest_2x);
            }
        }
        x.norm_silu_conv(&d.norm_out, &d.conv_out).join()
    }

    /// Image `[B, 3, H, W]` in [−1, 1] → (mean, logvar) `[B, 16, H/8, W/8]`,
    /// logvar clamped to [−30, 20]. `None` when the encoder was not loaded.
    pub fn encode(&self, image: Tensor<B, 4>) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        self.encode_within(image, DECODE_TENSOR_LIMIT_BYTES)
    }

    /// [`Self::encode`] with the levels whose activations exceed `limit`
    /// bytes run in row bands, as [`Self::decode_within`].
    pub fn encode_within(&self, image: Tensor<B, 4>, limit: u64) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let e = self.encoder.as_ref()?;
        // Bands sized for conv_in's output (3 → 128 channels), each a multiple
        // of 2^levels rows so that every downsampling halves whole pairs.
        let [c_out, c_in, ..] = e.conv_in.weight.dims();
        let align = 1 << e.down_blocks.iter().filter(|b| b.downsample.is_some()).count();
        let image = RowBands::whole(image).split(limit.saturating_mul(c_in as u64) / c_out.max(1) as u64, align);
        let mut x = image.conv3x3(&e.conv_in, 1, |x| x);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward_bands(x);
            }
            if let Some(down) = &block.downsample {
                x = x.downsample(down);
            }
        }
        let x = e.mid.forward(x.join(), limit);
        let x = apply_conv(&e.conv_out, e.norm_out.forward_silu(x));
        let [mean, logvar]: [Tensor<B, 4>; 2] = x.chunk(2, 1).try_into().expect("2 chunks");
        Some((mean, logvar.clamp(-30.0, 20.0)))
    }

    /// Model-space latents (what the DiT sees) → VAE space: `z / scaling + shift`.
    pub fn unscale(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents / self.scaling_factor + self.shift_factor
    }

    /// VAE space → model space: `(z − shift) · scaling`.
    pub fn scale(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        (z - self.shift_factor) * self.scaling_factor
    }
}

/// Nearest-neighbour ×2: `[B, C, H, W]` → `[B, C, 2H, 2W]`.
pub(crate) fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    if crate::fused::enabled::<B>(x.dtype()) {
        return crate::fused::upsample_nearest_2x(x);
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use burn::tensor::Distribution;

    fn randn<const D: usize>(shape: [usize; D]) -> Tensor<CpuBackend, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    #[test]
    fn training_convs_match_burns_conv_values_and_gradients() {
        use burn::nn::conv::Conv2dConfig;
        type Ad = burn::backend::Autodiff<CpuBackend>;
        let device = Default::default();
        // The VAE's three kinds: 3×3 padding 1, the downsampling (pad right and
        // bottom, stride 2), the 1×1 shortcut. Odd channel counts, even sides as in the VAE.
        let kinds = [
            ([3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1)),
            ([3, 3], [2, 2], PaddingConfig2d::Explicit(0, 0, 1, 1)),
            ([1, 1], [1, 1], PaddingConfig2d::Valid),
        ];
        for (kernel, stride, padding) in kinds {
            let conv: Conv2d<Ad> =
                Conv2dConfig::new([3, 5], kernel).with_stride(stride).with_padding(padding.clone()).init(&device);
            let x0 = randn([2, 3, 6, 8]);
            let run = |ours: bool| {
                let x = Tensor::<Ad, 4>::from_data(x0.to_data(), &device).require_grad();
                let y = if ours { training_conv(&conv, &x).expect("a training form") } else { conv.forward(x.clone()) };
                // A fixed, position-dependent upstream gradient.
                let n = y.dims().iter().product::<usize>();
                let w: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
                let up = Tensor::<Ad, 4>::from_data(burn::tensor::TensorData::new(w, y.dims()), &device);
                let g = (y.clone() * up).sum().backward();
                let flat = |t: Tensor<CpuBackend, 4>| t.into_data().to_vec::<f32>().unwrap();
                let gw = conv.weight.val().grad(&g).unwrap();
                let gb = conv.bias.as_ref().unwrap().val().grad(&g).unwrap();
                (flat(y.inner()), flat(x.grad(&g).unwrap()), flat(gw), gb.into_data().to_vec::<f32>().unwrap())
            };
            let (a, b) = (run(true), run(false));
            let close = |p: &[f32], q: &[f32]| p.len() == q.len() && p.iter().zip(q).all(|(u, v)| (u - v).abs() <= 1e-4 * (1.0 + v.abs()));
            assert!(close(&a.0, &b.0), "{kernel:?}/{stride:?}: values");
            assert!(close(&a.1, &b.1), "{kernel:?}/{stride:?}: input gradient");
            assert!(close(&a.2, &b.2), "{kernel:?}/{stride:?}: weight gradient");
            assert!(close(&a.3, &b.3), "{kernel:?}/{stride:?}: bias gradient");
        }
        // Not under autodiff: burn's own path.
        let conv: Conv2d<CpuBackend> = Conv2dConfig::new([3, 5], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
        assert!(training_conv(&conv, &randn([1, 3, 4, 4])).is_none());
    }

    fn random_norm(channels: usize, groups: usize) -> GroupNorm<CpuBackend> {
        let param = || burn::module::Param::from_tensor(randn([channels]));
        GroupNorm { weight: param(), bias: param(), groups }
    }

    /// Largest |a − b| relative to b's largest magnitude.
    fn rel_diff(a: Tensor<CpuBackend, 4>, b: Tensor<CpuBackend, 4>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(1e-12)
    }

    #[test]
    fn group_norm_over_row_bands_is_the_whole_tensors() {
        let norm = random_norm(12, 4);
        let x = randn([2, 12, 11, 7]) * 3.0 + 1.5;
        // Uneven bands, one of a single row.
        let bands = vec![x.clone().narrow(2, 0, 5), x.clone().narrow(2, 5, 1), x.clone().narrow(2, 6, 5)];
        let whole = norm.forward_silu(x);
        // On the CPU's kernels and through burn's ops (what a GPU runs).
        for (scale, shift) in [norm.band_affine(&bands), norm.band_affine_composed(&bands)] {
            for apply in [affine_silu, affine_silu_composed] {
                let banded = Tensor::cat(bands.iter().map(|t| apply(t.clone(), &scale, &shift)).collect(), 2);
                assert!(rel_diff(banded, whole.clone()) < 1e-5);
            }
        }
    }

    /// The GPU kernels' GroupNorm (`cube_kernels::group_sums`, `plane_affine`)
    /// against burn's ops on wgpu (Mesa's software Vulkan here), whole and
    /// over uneven row bands.
    #[cfg(feature = "wgpu")]
    #[test]
    fn group_norm_kernels_match_the_composed_ops_on_wgpu() {
        type W = crate::device::WgpuBackend;
        let device = Default::default();
        let randn = |shape: [usize; 4]| Tensor::<W, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let param = || burn::module::Param::from_tensor(Tensor::<W, 1>::random([12], Distribution::Normal(0.0, 1.0), &device));
        let norm = GroupNorm { weight: param(), bias: param(), groups: 4 };
        let x = randn([2, 12, 11, 7]) * 3.0 + 1.5;
        let close = |a: Tensor<W, 4>, b: Tensor<W, 4>, what: &str| {
            let scale: f32 = b.clone().abs().max().into_scalar();
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale, "{what}: {diff} (scale {scale})");
        };
        let expected = norm.forward_composed(x.clone());
        close(norm.forward_gpu(&x, false).expect("the kernels run on wgpu"), expected.clone(), "group norm");
        close(norm.forward_silu(x.clone()), silu(expected.clone()), "group norm + silu");
        let bands = vec![x.clone().narrow(2, 0, 5), x.clone().narrow(2, 5, 1), x.clone().narrow(2, 6, 5)];
        let (scale, shift) = norm.band_affine(&bands);
        let banded = Tensor::cat(bands.iter().map(|t| affine_silu(t.clone(), &scale, &shift)).collect(), 2);
        close(banded, silu(expected), "over row bands");
    }

    #[test]
    fn split_bands_keep_every_row_within_the_limit() {
        let x = randn([1, 4, 37, 8]); // 128 bytes a row
        let bands = RowBands::whole(x.clone()).split(128 * 8, 1);
        let rows: Vec<usize> = bands.bands.iter().map(|t| t.dims()[2]).collect();
        assert_eq!(rows.iter().sum::<usize>(), 37);
        assert!(rows.iter().all(|&r| (r + 2) * 128 <= 128 * 8), "{rows:?}");
        assert!(rel_diff(bands.join(), x.clone()) == 0.0);
        // Aligned to 4 rows: every band but the last a multiple of 4.
        let rows: Vec<usize> = RowBands::whole(x.clone()).split(128 * 8, 4).bands.iter().map(|t| t.dims()[2]).collect();
        assert_eq!((rows.iter().sum::<usize>(), rows.len()), (37, 9), "{rows:?}");
        assert!(rows[..8].iter().all(|&r| r == 4) && rows[8] == 5, "{rows:?}");
        // Within the limit: one band, untouched.
        assert_eq!(RowBands::whole(x).split(128 * 37, 1).bands.len(), 1);
    }

    #[test]
    fn banded_decode_is_the_whole_decode() {
        // Three levels, one upsampling at 2 bands' worth of rows and more, the
        // attention in query chunks: the limit is a few rows of the latent level.
        let config = VaeConfig::new().with_block_out_channels(vec![8, 16, 16]).with_layers_per_block(1).with_norm_num_groups(4);
        let vae = config.init::<CpuBackend>(&Default::default());
        let z = randn([2, 16, 7, 5]);
        let whole = vae.decode_within(z.clone(), u64::MAX);
        assert_eq!(whole.dims(), [2, 3, 28, 20]);
        for limit in [2 * 16 * 5 * 4 * 4, 2 * 16 * 5 * 4 * 9, 3000] {
            let banded = vae.decode_within(z.clone(), limit);
            assert!(rel_diff(banded, whole.clone()) < 1e-5, "limit {limit}");
        }
        // The default limit leaves small images whole: the same path as before.
        assert!(rel_diff(vae.decode(z), whole) == 0.0);
    }

    #[test]
    fn banded_encode_is_the_whole_encode() {
        // Two downsamplings: bands of 4k rows at the image, 2k, then k.
        let config = VaeConfig::new().with_block_out_channels(vec![8, 16, 16]).with_layers_per_block(1).with_norm_num_groups(4);
        let vae = Vae::build(&config, &mut RandomWeights::<CpuBackend>::new(&Default::default(), DType::F32), true).unwrap();
        let image = randn([2, 3, 28, 20]);
        let (mean, logvar) = vae.encode_within(image.clone(), u64::MAX).unwrap();
        assert_eq!(mean.dims(), [2, 16, 7, 5]);
        // conv_in's output rows are 2·8·20·4 bytes: bands of 4, 8 and more rows.
        for limit in [2 * 8 * 20 * 4 * 6, 2 * 8 * 20 * 4 * 10, 2 * 8 * 20 * 4 * 14] {
            let (m, l) = vae.encode_within(image.clone(), limit).unwrap();
            assert!(rel_diff(m, mean.clone()) < 1e-5 && rel_diff(l, logvar.clone()) < 1e-5, "limit {limit}");
        }
    }

    /// Burn's composed ops on views, as a GPU runs them: lavapipe here
    /// (`cargo test --release -p zimage-engine --features wgpu --lib banded`).
    #[cfg(feature = "wgpu")]
    #[test]
    fn banded_decode_is_the_whole_decode_on_wgpu() {
        type W = crate::device::WgpuBackend;
        let device = Default::default();
        let config = VaeConfig::new().with_block_out_channels(vec![8, 16, 16]).with_layers_per_block(1).with_norm_num_groups(4);
        let vae = config.init::<W>(&device);
        let z = Tensor::<W, 4>::random([2, 16, 7, 5], Distribution::Normal(0.0, 1.0), &device);
        let on_cpu = |t: Tensor<W, 4>| Tensor::<CpuBackend, 4>::from_data(t.into_data(), &Default::default());
        let whole = on_cpu(vae.decode_within(z.clone(), u64::MAX));
        for limit in [2 * 16 * 5 * 4 * 4, 3000] {
            let banded = on_cpu(vae.decode_within(z.clone(), limit));
            assert!(rel_diff(banded, whole.clone()) < 1e-4, "limit {limit}");
        }
    }

    #[test]
    fn chunked_mean_is_the_mean() {
        // 2·4096 values a row: chunked; 3·257 (no chunk size divides): one step.
        for n in [8192, 771] {
            let x = randn([2, 3, n]) * 2.0 + 0.5;
            let diff: f32 = (mean_last(x.clone()) - x.mean_dim(2)).abs().max().into_scalar();
            assert!(diff < 1e-5, "n {n}: {diff}");
        }
    }

    #[test]
    fn composed_group_norm_matches_the_fused_kernel() {
        let norm = random_norm(64, 32);
        let x = randn([1, 64, 32, 32]) * 3.0 + 1.5;
        let (fused, composed) = (norm.forward(x.clone()), norm.forward_composed(x));
        let diff: f32 = (fused - composed).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }
}
