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
        let mut side = 1u64;
        let mut largest = 0u64;
        let levels = self.block_out_channels.len();
        for (i, &channels) in self.block_out_channels.iter().rev().enumerate() {
            let cells = (h * w) as u64 * side * side;
            largest = largest.max(channels as u64 * cells);
            if i + 1 < levels {
                side *= 2;
                largest = largest.max(channels as u64 * cells * 4);
            }
        }
        let scores = ((h * w) as u64).pow(2);
        4 * (4 * largest) + 4 * scores
    }

    /// A model with fresh random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vae<B> {
        Vae::build(self, &mut RandomWeights::new(device, DType::F32), true).expect("random init cannot fail")
    }
}

const GN_EPS: f64 = 1e-6;

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
        self.forward_composed(x)
    }

    /// `silu(norm(x))`, the pair every VAE block applies.
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if crate::fused::enabled::<B>(x.dtype()) {
            return crate::fused::group_norm(x, self.groups, self.weight.val(), self.bias.val(), GN_EPS, true);
        }
        silu(self.forward_composed(x))
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
        let h = apply_conv(&self.conv1, self.norm1.forward_silu(x.clone()));
        let h = apply_conv(&self.conv2, self.norm2.forward_silu(h));
        match &self.conv_shortcut {
            Some(s) => apply_conv(s, x) + h,
            None => x + h,
        }
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
    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let heads = |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(1);
        let q = heads(self.to_q.forward(tokens.clone()));
        let k = heads(self.to_k.forward(tokens.clone()));
        let v = heads(self.to_v.forward(tokens));
        let o = sdpa(q, k, v, None, false).squeeze_dim::<3>(1);
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

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.resnet_2.forward(self.attention.forward(self.resnet_1.forward(x)))
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
    /// bytes (an upper estimate, used to refuse sizes that cannot fit). The
    /// largest tensor is a level's output upsampled ×2 before its conv; about
    /// four tensors of that size live at once (input, GroupNorm output, conv
    /// output, residual). The mid-block attention is counted as if its
    /// `(h·w)²` scores were materialised.
    pub fn decode_working_bytes(&self, h: usize, w: usize) -> u64 {
        let mut side = 1u64; // pixels per latent cell at the current level
        let mut largest = 0u64;
        for block in &self.decoder.up_blocks {
            let channels = block.resnets.last().map(|r| r.conv2.weight.dims()[0]).unwrap_or(0) as u64;
            let cells = (h * w) as u64 * side * side;
            largest = largest.max(channels * cells);
            if block.upsample.is_some() {
                side *= 2;
                largest = largest.max(channels * cells * 4);
            }
        }
        let scores = ((h * w) as u64).pow(2);
        4 * (4 * largest) + 4 * scores
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

    /// VAE-space latents `[B, 16, h, w]` → image `[B, 3, 8h, 8w]` (unclamped).
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = &self.decoder;
        let mut x = d.mid.forward(apply_conv(&d.conv_in, z));
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x);
            }
            if let Some(up) = &block.upsample {
                x = apply_conv(up, upsample_nearest_2x(x));
            }
        }
        apply_conv(&d.conv_out, d.norm_out.forward_silu(x))
    }

    /// Image `[B, 3, H, W]` in [−1, 1] → (mean, logvar) `[B, 16, H/8, W/8]`,
    /// logvar clamped to [−30, 20]. `None` when the encoder was not loaded.
    pub fn encode(&self, image: Tensor<B, 4>) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let e = self.encoder.as_ref()?;
        let mut x = apply_conv(&e.conv_in, image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x);
            }
            if let Some(down) = &block.downsample {
                x = apply_conv(down, x);
            }
        }
        let x = apply_conv(&e.conv_out, e.norm_out.forward_silu(e.mid.forward(x)));
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
        let norm = GroupNorm::<CpuBackend> {
            weight: burn::module::Param::from_tensor(randn([64])),
            bias: burn::module::Param::from_tensor(randn([64])),
            groups: 32,
        };
        let x = randn([1, 64, 32, 32]) * 3.0 + 1.5;
        let (fused, composed) = (norm.forward(x.clone()), norm.forward_composed(x));
        let diff: f32 = (fused - composed).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }
}
