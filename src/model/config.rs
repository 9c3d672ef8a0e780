//! Model configuration: what `empf train` builds, stored as text in checkpoints so that `empf eval`,
//! `empf export` and `--resume` rebuild the same network.

use crate::error::{Error, Result};
pub use crate::model::blocks::SecaMode;
use std::collections::BTreeMap;
use std::fmt;

/// Which spiking neuron a layer uses (EMPF.md §1, §3, §5, §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NeuronKind {
    /// EM-PF Version I: learnable λ[t], θ[t].
    V1,
    /// EM-PF Version II: membrane-potential BatchNorm.
    V2,
    /// EM-PF Version III: parallel, no membrane state.
    V3,
    /// LIF baseline (binary spikes, triangle surrogate, soft reset).
    Lif,
}

impl NeuronKind {
    /// `v1`, `v2`, `v3`, `lif`.
    pub fn name(&self) -> &'static str {
        match self {
            NeuronKind::V1 => "v1",
            NeuronKind::V2 => "v2",
            NeuronKind::V3 => "v3",
            NeuronKind::Lif => "lif",
        }
    }
    /// Parse [`NeuronKind::name`] (also `I`, `II`, `III`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "v1" | "i" | "1" => Ok(NeuronKind::V1),
            "v2" | "ii" | "2" => Ok(NeuronKind::V2),
            "v3" | "iii" | "3" => Ok(NeuronKind::V3),
            "lif" => Ok(NeuronKind::Lif),
            _ => Err(Error::Config(format!(
                "unknown neuron `{s}` (expected v1, v2, v3 or lif)"
            ))),
        }
    }
}

impl fmt::Display for NeuronKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Stem of a ResNet (EMPF.md §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Stem {
    /// FP conv3x3 stride 1 + BN (CIFAR, DVS).
    #[default]
    Cifar,
    /// FP conv7x7 stride 2 + BN + max-pool 3x3 stride 2 (ImageNet).
    Imagenet,
}

impl Stem {
    /// `cifar`, `imagenet`.
    pub fn name(&self) -> &'static str {
        match self {
            Stem::Cifar => "cifar",
            Stem::Imagenet => "imagenet",
        }
    }
    /// Parse [`Stem::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cifar" => Ok(Stem::Cifar),
            "imagenet" => Ok(Stem::Imagenet),
            _ => Err(Error::Config(format!(
                "unknown stem `{s}` (expected cifar or imagenet)"
            ))),
        }
    }
}

/// How many neurons of a residual block are parallel (Version III), EMPF.md §6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Parallel {
    /// N1 is the configured neuron (Version I or II), N2 Version III ("50% parallel").
    #[default]
    Half,
    /// N1 and N2 both Version III ("100% parallel").
    All,
}

impl Parallel {
    /// `half`, `all`.
    pub fn name(&self) -> &'static str {
        match self {
            Parallel::Half => "half",
            Parallel::All => "all",
        }
    }
    /// Parse [`Parallel::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "half" | "50" => Ok(Parallel::Half),
            "all" | "100" => Ok(Parallel::All),
            _ => Err(Error::Config(format!(
                "unknown parallel `{s}` (expected half or all)"
            ))),
        }
    }
}

/// Architecture options beyond the basic fields (ResNets, VGGs). All default to the paper's
/// plain setting; [`ModelConfig::to_text`] writes only the non-default ones, so older configs
/// read back unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ArchOptions {
    /// Channel attention in residual blocks (`seca = none|i|ii`).
    pub seca: SecaMode,
    /// ResNet stem (`stem = cifar|imagenet`).
    pub stem: Stem,
    /// Parallel neurons in residual blocks (`parallel = half|all`).
    pub parallel: Parallel,
}

/// A network to build.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Architecture name: `mnist-cnn` (the benchmark network), `small` (the quick-start default).
    pub arch: String,
    /// Neuron of the spiking layers.
    pub neuron: NeuronKind,
    /// Time-steps T.
    pub steps: usize,
    /// Channel widths of the conv stages (architecture-specific meaning).
    pub widths: Vec<usize>,
    /// Input shape C x H x W.
    pub input: [usize; 3],
    /// Classes.
    pub classes: usize,
    /// Quantisation-aware training of k-bit spikes (EMPF.md §10): a `SpikeQuant` before every
    /// binary synaptic layer. `None`: float spikes. Stored as `spike_bits=`/`spike_step=` lines only
    /// when set, so older config texts still parse.
    pub spike_quant: Option<SpikeQuantConfig>,
    /// Architecture options (SECA, stem, parallel neurons).
    pub opts: ArchOptions,
}

/// k-bit spike quantisation: `q(s) = clamp(round(s/step), 0, 2^bits − 1)·step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpikeQuantConfig {
    /// Bits per spike, 1..=8.
    pub bits: u32,
    /// Quantisation step (the spec's 4-bit rule: 1/4).
    pub step: f64,
}

impl Default for ModelConfig {
    /// The benchmark network ([`ModelConfig::mnist_cnn`]).
    fn default() -> Self {
        ModelConfig::mnist_cnn()
    }
}

impl ModelConfig {
    /// The benchmark network "mnist-cnn" (issue 3): FP conv3x3 1→32 + BN → EM-PF → BConv3x3 32→64 + BN →
    /// EM-PF → AvgPool2 → BConv3x3 64→128 + BN → EM-PF → AvgPool2 → GAP → FP Linear 128→10, T = 4.
    pub fn mnist_cnn() -> Self {
        ModelConfig {
            arch: "mnist-cnn".into(),
            neuron: NeuronKind::V1,
            steps: 4,
            widths: vec![32, 64, 128],
            input: [1, 28, 28],
            classes: 10,
            spike_quant: None,
            opts: ArchOptions::default(),
        }
    }

    /// Serialise as `key=value` lines.
    pub fn to_text(&self) -> String {
        let w: Vec<String> = self.widths.iter().map(|x| x.to_string()).collect();
        let quant = match &self.spike_quant {
            Some(q) => format!("spike_bits={}\nspike_step={}\n", q.bits, q.step),
            None => String::new(),
        };
        let d = ArchOptions::default();
        let mut extra = String::new();
        if self.opts.seca != d.seca {
            extra += &format!("seca={}\n", self.opts.seca.name());
        }
        if self.opts.stem != d.stem {
            extra += &format!("stem={}\n", self.opts.stem.name());
        }
        if self.opts.parallel != d.parallel {
            extra += &format!("parallel={}\n", self.opts.parallel.name());
        }
        let base = format!(
            "arch={}\nneuron={}\nsteps={}\nwidths={}\ninput={}x{}x{}\nclasses={}\n",
            self.arch,
            self.neuron,
            self.steps,
            w.join(","),
            self.input[0],
            self.input[1],
            self.input[2],
            self.classes
        );
        quant + &base + &extra
    }

    /// Parse [`ModelConfig::to_text`].
    pub fn from_text(s: &str) -> Result<Self> {
        let kv = parse_kv(s)?;
        let get = |k: &str| {
            kv.get(k)
                .ok_or_else(|| Error::Config(format!("model config lacks `{k}`")))
        };
        let num = |k: &str, v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| Error::Config(format!("model config `{k}`: `{v}` is not a number")))
        };
        let widths = get("widths")?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| num("widths", x))
            .collect::<Result<Vec<_>>>()?;
        let dims = get("input")?
            .split('x')
            .map(|x| num("input", x))
            .collect::<Result<Vec<_>>>()?;
        if dims.len() != 3 {
            return Err(Error::Config(format!(
                "model config `input`: expected CxHxW, got `{}`",
                get("input")?
            )));
        }
        let c = ModelConfig {
            arch: get("arch")?.clone(),
            neuron: NeuronKind::parse(get("neuron")?)?,
            steps: num("steps", get("steps")?)?,
            widths,
            input: [dims[0], dims[1], dims[2]],
            classes: num("classes", get("classes")?)?,
            spike_quant: match kv.get("spike_bits") {
                None => None,
                Some(b) => Some(SpikeQuantConfig {
                    bits: num("spike_bits", b)? as u32,
                    step: match kv.get("spike_step") {
                        Some(v) => v.trim().parse::<f64>().map_err(|_| {
                            Error::Config(format!(
                                "model config `spike_step`: `{v}` is not a number"
                            ))
                        })?,
                        None => 0.25,
                    },
                }),
            },
            opts: ArchOptions {
                seca: kv
                    .get("seca")
                    .map_or(Ok(SecaMode::None), |v| SecaMode::parse(v))?,
                stem: kv.get("stem").map_or(Ok(Stem::Cifar), |v| Stem::parse(v))?,
                parallel: kv
                    .get("parallel")
                    .map_or(Ok(Parallel::Half), |v| Parallel::parse(v))?,
            },
        };
        c.validate()?;
        Ok(c)
    }

    /// Check the numbers make sense.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > 1024 {
            return Err(Error::Config(format!(
                "time-steps must be in 1..=1024, got {}",
                self.steps
            )));
        }
        if self.classes < 2 {
            return Err(Error::Config(format!(
                "need at least 2 classes, got {}",
                self.classes
            )));
        }
        if self.widths.iter().any(|&w| w == 0 || w > 16384) {
            return Err(Error::Config(format!(
                "widths must be in 1..=16384, got {:?}",
                self.widths
            )));
        }
        if let Some(q) = &self.spike_quant
            && !((1..=8).contains(&q.bits) && q.step.is_finite() && q.step > 0.0)
        {
            return Err(Error::Config(format!(
                "spike quantisation: bits must be 1..=8 and the step positive, got {} and {}",
                q.bits, q.step
            )));
        }
        if self.input.iter().any(|&d| d == 0 || d > 4096) {
            return Err(Error::Config(format!(
                "input dimensions must be in 1..=4096, got {:?}",
                self.input
            )));
        }
        Ok(())
    }
}

/// Parse `key=value` lines (blank lines and `#` comments ignored).
pub fn parse_kv(s: &str) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for (i, line) in s.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            Error::Config(format!("line {}: expected key=value, got `{line}`", i + 1))
        })?;
        m.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_config_text_round_trip_and_errors() {
        let c = ModelConfig::mnist_cnn();
        assert_eq!(ModelConfig::from_text(&c.to_text()).unwrap(), c);
        assert!(
            ModelConfig::from_text("arch=x\n")
                .unwrap_err()
                .to_string()
                .contains("lacks")
        );
        let bad = c.to_text().replace("steps=4", "steps=0");
        assert!(
            ModelConfig::from_text(&bad)
                .unwrap_err()
                .to_string()
                .contains("time-steps")
        );
        let q = ModelConfig {
            spike_quant: Some(SpikeQuantConfig {
                bits: 4,
                step: 0.25,
            }),
            ..ModelConfig::mnist_cnn()
        };
        assert_eq!(ModelConfig::from_text(&q.to_text()).unwrap(), q);
        assert!(
            !c.to_text().contains("spike"),
            "float configs keep the old text"
        );
        assert_eq!(NeuronKind::parse("II").unwrap(), NeuronKind::V2);
        // architecture options: written only when not default, read back
        assert!(!c.to_text().contains("seca"));
        let r = ModelConfig {
            opts: ArchOptions {
                seca: SecaMode::II,
                stem: Stem::Imagenet,
                parallel: Parallel::All,
            },
            ..c.clone()
        };
        assert!(
            r.to_text()
                .contains("seca=ii\nstem=imagenet\nparallel=all\n")
        );
        assert_eq!(ModelConfig::from_text(&r.to_text()).unwrap(), r);
        assert!(
            ModelConfig::from_text(&(c.to_text() + "seca=iii\n"))
                .unwrap_err()
                .to_string()
                .contains("seca")
        );
        assert!(NeuronKind::parse("v9").is_err());
    }
}
