//! Gradient separability (EMPF.md §2): the exact BPTT gradient and the online gradient of every
//! parameter of a network, for the same weights and the same batch, and how far they agree.
//!
//! [`gradients`] runs [`train_batch`] twice on the same network, once with [`BpMode::Bptt`] and once
//! with [`BpMode::Online`], each from a fresh neuron state (v[0] = 0) and zeroed gradients, and
//! returns both gradients of every trainable parameter. The network is left as it was: the
//! gradients it held and its BatchNorm running statistics (which a training-mode forward updates)
//! are restored.
//!
//! [`analyse`] adds the statistics the separability claims are about:
//! * per parameter and per layer (all parameters of a layer concatenated): cosine similarity,
//!   relative L2 error `|g_online − g_bptt| / |g_bptt|` and sign agreement (fraction of elements,
//!   among those where either gradient is non-zero, whose signs agree); see [`Agreement`];
//! * per spiking layer, the firing pattern that decides the temporal weights ε[i,t] of §2
//!   ([`Firing`]): for every neuron trajectory (one sample, one unit, all T steps) whether it fired
//!   at every step (case (i): ε[i,t] = δ[i,t], online == BPTT), never (case (ii): both gradients
//!   zero), or sometimes (mixed: separable, not equal). Firing is read from the layer's output:
//!   EM-PF spikes are `ReLU(m − θ)`, positive exactly when `H(m − θ) = 1`; LIF spikes are 0 or 1.
//!   For LIF the cases are reported too, but Theorem 4.2 does not apply (its surrogate depends on
//!   `m`), and Version III has no temporal path at all (every neuron is trivially separable).
//!
//! The firing masks are recorded by a separate training-mode forward over the network's top-level
//! layers (the same values both gradient runs see), so no layer needs a recording hook.

use crate::error::{Error, Result};
use crate::layers::{Layer, Param, ParamKind, State, StepCtx};
use crate::metrics::json_str;
use crate::model::Sequential;
use crate::rng::Rng;
use crate::tensor::{Real, Tensor};
use crate::train::step::{BpMode, StepInput, StepLoss, train_batch};
use std::fmt::Write as _;

/// Layer kinds whose outputs are spikes (their firing is summarised).
pub const SPIKING_KINDS: [&str; 5] = ["EmpfV1", "EmpfV2", "EmpfV3", "EmpfFolded", "Lif"];

/// Both gradients of every trainable parameter of a network, in visiting order.
#[derive(Clone, Debug)]
pub struct Gradients<R: Real> {
    /// Parameter names (checkpoint keys, without the `param.` prefix).
    pub names: Vec<String>,
    /// Top-level layer each parameter belongs to.
    pub layers: Vec<String>,
    /// Parameter kinds.
    pub kinds: Vec<ParamKind>,
    /// Exact BPTT gradients (`dL/dp`, L = mean over t of the per-step loss).
    pub bptt: Vec<Tensor<R>>,
    /// Online gradients (same loss, temporal path through v[t−1] cut).
    pub online: Vec<Tensor<R>>,
    /// Loss of the batch (the same forward in both modes).
    pub loss: f64,
    /// Outputs O[t] of the BPTT run.
    pub outputs: Vec<Tensor<R>>,
}

/// Values of every non-trainable buffer (BatchNorm running statistics) and every gradient.
fn snapshot<R: Real>(net: &mut dyn Layer<R>) -> Vec<(Tensor<R>, Tensor<R>)> {
    let mut out = Vec::new();
    net.visit_params(&mut |p: &mut Param<R>| out.push((p.value.clone(), p.grad.clone())));
    out
}

fn restore<R: Real>(net: &mut dyn Layer<R>, snap: Vec<(Tensor<R>, Tensor<R>)>) {
    let mut it = snap.into_iter();
    net.visit_params(&mut |p: &mut Param<R>| {
        if let Some((v, g)) = it.next() {
            if !p.trainable() {
                p.value = v;
            }
            p.grad = g;
        }
    });
}

/// Compute the BPTT and the online gradient of every trainable parameter for one batch.
///
/// `loss(t, O[t])` returns the step's loss and `dL[t]/dO[t]` (as for [`train_batch`]). The
/// network's parameters, gradients and buffers are unchanged on return.
pub fn gradients<R: Real>(
    net: &mut Sequential<R>,
    input: StepInput<'_, R>,
    steps: usize,
    loss: &mut StepLoss<'_, R>,
) -> Result<Gradients<R>> {
    if steps == 0 {
        return Err(Error::Config("separability: T must be at least 1".into()));
    }
    let snap = snapshot(net);
    let mut names = Vec::new();
    let mut layers = Vec::new();
    let mut kinds = Vec::new();
    for l in net.layers.iter_mut() {
        let lname = l.name().to_string();
        l.visit_params(&mut |p: &mut Param<R>| {
            if p.trainable() {
                names.push(p.name.clone());
                layers.push(lname.clone());
                kinds.push(p.kind);
            }
        });
    }
    let mut run =
        |net: &mut Sequential<R>, mode: BpMode| -> Result<(Vec<Tensor<R>>, f64, Vec<_>)> {
            net.visit_params(&mut |p: &mut Param<R>| {
                if p.trainable() {
                    p.zero_grad()
                }
            });
            let mut rng = Rng::new(0);
            let res = train_batch(net, input, steps, mode, &mut rng, loss, None)?;
            let mut g = Vec::new();
            net.visit_params(&mut |p: &mut Param<R>| {
                if p.trainable() {
                    g.push(p.grad.clone())
                }
            });
            Ok((g, res.loss, res.outputs))
        };
    let bptt = run(net, BpMode::Bptt);
    let online = run(net, BpMode::Online);
    restore(net, snap);
    let (bptt, loss_value, outputs) = bptt?;
    let (online, _, _) = online?;
    Ok(Gradients {
        names,
        layers,
        kinds,
        bptt,
        online,
        loss: loss_value,
        outputs,
    })
}

/// How well two gradients agree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Elements compared.
    pub len: usize,
    /// `<g_o, g_b> / (|g_o| |g_b|)`; 1 when both are zero, 0 when exactly one is.
    pub cosine: f64,
    /// `|g_o − g_b| / |g_b|`; 0 when both are zero, infinite when only `g_b` is.
    pub rel_l2: f64,
    /// Fraction of the elements where either gradient is non-zero whose signs (−, 0, +) agree (1
    /// when both are zero everywhere).
    pub sign_agree: f64,
    /// Largest `|g_o − g_b|`.
    pub max_abs_diff: f64,
    /// `|g_b|`.
    pub norm_bptt: f64,
    /// `|g_o|`.
    pub norm_online: f64,
}

impl Agreement {
    /// Compare `online` with `bptt` (pairs of equal-length slices, taken as one vector).
    pub fn of<R: Real>(pairs: &[(&[R], &[R])]) -> Agreement {
        let (mut oo, mut bb, mut ob, mut dd, mut maxd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let (mut nz, mut agree, mut len) = (0usize, 0usize, 0usize);
        for (o, b) in pairs {
            for (&o, &b) in o.iter().zip(b.iter()) {
                let (o, b) = (o.f64(), b.f64());
                oo += o * o;
                bb += b * b;
                ob += o * b;
                let d = o - b;
                dd += d * d;
                maxd = maxd.max(d.abs());
                len += 1;
                if o != 0.0 || b != 0.0 {
                    nz += 1;
                    if sign(o) == sign(b) {
                        agree += 1;
                    }
                }
            }
        }
        let (no, nb) = (oo.sqrt(), bb.sqrt());
        let cosine = match (no > 0.0, nb > 0.0) {
            (false, false) => 1.0,
            // identical gradients: exactly 1 (the quotient may round to 1 − ε)
            (true, true) if dd == 0.0 => 1.0,
            (true, true) => (ob / (no * nb)).clamp(-1.0, 1.0),
            _ => 0.0,
        };
        let rel_l2 = if nb > 0.0 {
            dd.sqrt() / nb
        } else if no > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        Agreement {
            len,
            cosine,
            rel_l2,
            sign_agree: if nz == 0 {
                1.0
            } else {
                agree as f64 / nz as f64
            },
            max_abs_diff: maxd,
            norm_bptt: nb,
            norm_online: no,
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"len\": {}, \"cosine\": {}, \"rel_l2\": {}, \"sign_agree\": {}, \"max_abs_diff\": {}, \"norm_bptt\": {}, \"norm_online\": {}}}",
            self.len,
            num(self.cosine),
            num(self.rel_l2),
            num(self.sign_agree),
            num(self.max_abs_diff),
            num(self.norm_bptt),
            num(self.norm_online)
        )
    }
}

fn sign(x: f64) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// A JSON number (`null` for NaN and infinities, which JSON cannot hold).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn slice<R: Real>(t: &Tensor<R>) -> &[R] {
    t.as_slice().expect("gradients are in standard layout")
}

/// Firing pattern of one spiking layer over a batch (what decides ε[i,t], EMPF.md §2).
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    /// Layer name.
    pub layer: String,
    /// Layer kind (`EmpfV1`, `Lif`, ...).
    pub kind: String,
    /// Neuron trajectories (samples × units).
    pub trajectories: usize,
    /// `hist[k]`: trajectories that fired at exactly `k` of the T steps (`k = 0..=T`).
    pub hist: Vec<usize>,
}

impl Firing {
    fn frac(&self, k: usize) -> f64 {
        self.hist[k] as f64 / self.trajectories.max(1) as f64
    }
    /// Case (i): fired at every step (ε[i,t] = 1 if i = t else 0).
    pub fn always(&self) -> f64 {
        self.frac(self.hist.len() - 1)
    }
    /// Case (ii): never fired (ε = 0, both gradients zero).
    pub fn silent(&self) -> f64 {
        self.frac(0)
    }
    /// Mixed: fired at some steps only (separable but not equal). With T = 1 there is no such case.
    pub fn mixed(&self) -> f64 {
        let inner: usize = self.hist[1..self.hist.len() - 1].iter().sum();
        inner as f64 / self.trajectories.max(1) as f64
    }
    /// Mean firing rate (fraction of neuron-steps that fired).
    pub fn rate(&self) -> f64 {
        let steps = self.hist.len() - 1;
        let fired: usize = self.hist.iter().enumerate().map(|(k, &n)| k * n).sum();
        fired as f64 / (self.trajectories * steps).max(1) as f64
    }
    fn json(&self) -> String {
        format!(
            "{{\"kind\": {}, \"trajectories\": {}, \"always\": {}, \"silent\": {}, \"mixed\": {}, \"rate\": {}, \"hist\": [{}]}}",
            json_str(&self.kind),
            self.trajectories,
            num(self.always()),
            num(self.silent()),
            num(self.mixed()),
            num(self.rate()),
            self.hist
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Firing pattern of every top-level spiking layer ([`SPIKING_KINDS`]) for one batch, from a
/// training-mode forward (batch statistics in BatchNorm, as in both gradient runs). Buffers are
/// restored afterwards.
pub fn firing<R: Real>(
    net: &mut Sequential<R>,
    input: StepInput<'_, R>,
    steps: usize,
) -> Result<Vec<Firing>> {
    let snap = snapshot(net);
    let res = firing_inner(net, input, steps);
    restore(net, snap);
    res
}

fn firing_inner<R: Real>(
    net: &mut Sequential<R>,
    input: StepInput<'_, R>,
    steps: usize,
) -> Result<Vec<Firing>> {
    let n = net.layers.len();
    let mut states: Vec<State<R>> = vec![State::Empty; n];
    // per spiking layer: per element, number of steps fired
    let mut counts: Vec<Option<Vec<u32>>> = vec![None; n];
    for t in 0..steps {
        let ctx = StepCtx::train(t, steps, crate::layers::GradMode::Bptt);
        let mut x = match input {
            StepInput::Static(x) => x.clone(),
            StepInput::Frames(f) => {
                if f.is_empty() {
                    return Err(Error::Config("separability: no input frames".into()));
                }
                f[t.min(f.len() - 1)].clone()
            }
        };
        for (i, l) in net.layers.iter_mut().enumerate() {
            x = l.forward(&x, &ctx, &mut states[i], None)?;
            if SPIKING_KINDS.contains(&l.kind()) {
                let c = counts[i].get_or_insert_with(|| vec![0; x.len()]);
                if c.len() != x.len() {
                    return Err(Error::Internal(format!(
                        "layer `{}`: output size changed between steps",
                        l.name()
                    )));
                }
                for (c, &s) in c.iter_mut().zip(x.iter()) {
                    *c += u32::from(s > R::zero());
                }
            }
        }
    }
    let mut out = Vec::new();
    for (i, c) in counts.into_iter().enumerate() {
        if let Some(c) = c {
            let mut hist = vec![0usize; steps + 1];
            for &k in &c {
                hist[k as usize] += 1;
            }
            out.push(Firing {
                layer: net.layers[i].name().to_string(),
                kind: net.layers[i].kind().to_string(),
                trajectories: c.len(),
                hist,
            });
        }
    }
    Ok(out)
}

/// One row of the per-layer table.
#[derive(Clone, Debug)]
pub struct LayerRow {
    /// Layer name.
    pub layer: String,
    /// Layer kind.
    pub kind: String,
    /// Agreement over all the layer's trainable parameters (None when it has none).
    pub grad: Option<Agreement>,
    /// Firing summary (spiking layers).
    pub firing: Option<Firing>,
}

/// Everything [`analyse`] measured for one network and batch.
#[derive(Clone, Debug)]
pub struct Report {
    /// Free-form label (e.g. the neuron kind).
    pub label: String,
    /// Time-steps.
    pub steps: usize,
    /// Batch size.
    pub batch: usize,
    /// Loss of the batch.
    pub loss: f64,
    /// Per parameter: (name, layer, agreement).
    pub params: Vec<(String, String, Agreement)>,
    /// Per top-level layer with parameters or spikes, in network order.
    pub layers: Vec<LayerRow>,
    /// Over all weights and BatchNorm parameters (neuron parameters a, b, c, d excluded: they
    /// hold the θ exception).
    pub synaptic: Agreement,
    /// Over every trainable parameter.
    pub all: Agreement,
}

/// Both gradients, their agreement per parameter and per layer, and the firing summary.
pub fn analyse<R: Real>(
    net: &mut Sequential<R>,
    input: StepInput<'_, R>,
    steps: usize,
    loss: &mut StepLoss<'_, R>,
    label: &str,
) -> Result<Report> {
    let g = gradients(net, input, steps, loss)?;
    let fire = firing(net, input, steps)?;
    Ok(report(net, &g, fire, steps, label))
}

/// Build the [`Report`] from computed gradients and firing summaries.
pub fn report<R: Real>(
    net: &Sequential<R>,
    g: &Gradients<R>,
    mut fire: Vec<Firing>,
    steps: usize,
    label: &str,
) -> Report {
    let pair = |i: usize| (slice(&g.online[i]), slice(&g.bptt[i]));
    let params = (0..g.names.len())
        .map(|i| {
            (
                g.names[i].clone(),
                g.layers[i].clone(),
                Agreement::of(&[pair(i)]),
            )
        })
        .collect();
    let mut layers = Vec::new();
    for l in &net.layers {
        let idx: Vec<usize> = (0..g.names.len())
            .filter(|&i| g.layers[i] == l.name())
            .collect();
        let f = fire
            .iter()
            .position(|f| f.layer == l.name())
            .map(|k| fire.remove(k));
        if idx.is_empty() && f.is_none() {
            continue;
        }
        let pairs: Vec<_> = idx.iter().map(|&i| pair(i)).collect();
        layers.push(LayerRow {
            layer: l.name().to_string(),
            kind: l.kind().to_string(),
            grad: (!idx.is_empty()).then(|| Agreement::of(&pairs)),
            firing: f,
        });
    }
    let syn: Vec<_> = (0..g.names.len())
        .filter(|&i| g.kinds[i] != ParamKind::Neuron)
        .map(pair)
        .collect();
    let all: Vec<_> = (0..g.names.len()).map(pair).collect();
    Report {
        label: label.to_string(),
        steps,
        batch: g.outputs.first().map_or(0, |o| o.shape()[0]),
        loss: g.loss,
        params,
        layers,
        synaptic: Agreement::of(&syn),
        all: Agreement::of(&all),
    }
}

impl Report {
    /// The per-layer table (plain text).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} (T = {}, batch {}, loss {:.4})",
            self.label, self.steps, self.batch, self.loss
        );
        let _ = writeln!(
            s,
            "{:<8} {:<13} {:>9} {:>10} {:>8} | {:>7} {:>7} {:>7} {:>6}",
            "layer", "kind", "cosine", "rel L2", "sign", "always", "silent", "mixed", "rate"
        );
        for r in &self.layers {
            let _ = write!(s, "{:<8} {:<13}", r.layer, r.kind);
            match &r.grad {
                Some(a) => {
                    let _ = write!(
                        s,
                        " {:>9.6} {:>10.3e} {:>8.4}",
                        a.cosine, a.rel_l2, a.sign_agree
                    );
                }
                None => {
                    let _ = write!(s, " {:>9} {:>10} {:>8}", "-", "-", "-");
                }
            }
            match &r.firing {
                Some(f) => {
                    let _ = writeln!(
                        s,
                        " | {:>7.4} {:>7.4} {:>7.4} {:>6.3}",
                        f.always(),
                        f.silent(),
                        f.mixed(),
                        f.rate()
                    );
                }
                None => {
                    let _ = writeln!(s, " |");
                }
            }
        }
        for (name, a) in [("weights+BN", &self.synaptic), ("all params", &self.all)] {
            let _ = writeln!(
                s,
                "{:<22} {:>9.6} {:>10.3e} {:>8.4} |",
                name, a.cosine, a.rel_l2, a.sign_agree
            );
        }
        s
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|r| {
                format!(
                    "{{\"layer\": {}, \"kind\": {}, \"grad\": {}, \"firing\": {}}}",
                    json_str(&r.layer),
                    json_str(&r.kind),
                    r.grad.map_or("null".into(), |a| a.json()),
                    r.firing.as_ref().map_or("null".into(), |f| f.json())
                )
            })
            .collect();
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(n, l, a)| {
                format!(
                    "{{\"name\": {}, \"layer\": {}, \"grad\": {}}}",
                    json_str(n),
                    json_str(l),
                    a.json()
                )
            })
            .collect();
        format!(
            "{{\"label\": {}, \"steps\": {}, \"batch\": {}, \"loss\": {}, \"synaptic\": {}, \"all\": {}, \"layers\": [{}], \"params\": [{}]}}",
            json_str(&self.label),
            self.steps,
            self.batch,
            num(self.loss),
            self.synaptic.json(),
            self.all.json(),
            layers.join(", "),
            params.join(", ")
        )
    }

    /// Per-layer cosine similarity `(layer, cosine)` of the layers that have parameters.
    pub fn cosines(&self) -> Vec<(String, f64)> {
        self.layers
            .iter()
            .filter_map(|r| r.grad.map(|a| (r.layer.clone(), a.cosine)))
            .collect()
    }
}

/// A grouped bar chart (SVG) of per-layer cosine similarity, one colour per report (e.g. LIF vs
/// EM-PF versions). Layers are taken in first-seen order over the reports.
pub fn cosine_svg(reports: &[Report]) -> String {
    let mut layers: Vec<String> = Vec::new();
    for r in reports {
        for (l, _) in r.cosines() {
            if !layers.contains(&l) {
                layers.push(l);
            }
        }
    }
    let colours = [
        "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let (pad, ph) = (50.0, 260.0);
    let group = 14.0 * reports.len().max(1) as f64 + 16.0;
    let w = 2.0 * pad + group * layers.len().max(1) as f64 + 120.0;
    let h = ph + 2.0 * pad + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"13\">cosine(online gradient, BPTT gradient) per layer</text>\n"
    );
    // y axis: cosine from -1 to 1 would waste space; show [min(0, lowest), 1]
    let lo = reports
        .iter()
        .flat_map(|r| r.cosines())
        .map(|(_, c)| c)
        .fold(0.0f64, f64::min);
    let y = |c: f64| pad + ph * (1.0 - (c - lo) / (1.0 - lo).max(1e-9));
    for k in 0..=4 {
        let c = lo + (1.0 - lo) * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{pad}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{c:.2}</text>",
            w - 120.0,
            y(c),
            y(c),
            pad - 4.0,
            y(c) + 4.0
        );
    }
    for (li, l) in layers.iter().enumerate() {
        let x0 = pad + group * li as f64 + 8.0;
        for (ri, r) in reports.iter().enumerate() {
            if let Some((_, c)) = r.cosines().into_iter().find(|(n, _)| n == l) {
                let (top, bot) = (y(c.max(lo)).min(y(0.0)), y(c.max(lo)).max(y(0.0)));
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"12\" height=\"{:.1}\" fill=\"{}\"><title>{} {l}: {c:.6}</title></rect>",
                    x0 + 14.0 * ri as f64,
                    (bot - top).max(0.5),
                    colours[ri % colours.len()],
                    xml(&r.label)
                );
            }
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + 7.0 * reports.len() as f64,
            pad + ph + 16.0,
            xml(l)
        );
    }
    for (ri, r) in reports.iter().enumerate() {
        let yy = pad + 16.0 * ri as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            w - 110.0,
            yy,
            colours[ri % colours.len()],
            w - 94.0,
            yy + 10.0,
            xml(&r.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_of_equal_opposite_and_zero_gradients() {
        let a = [1.0f64, -2.0, 0.0];
        let same = Agreement::of(&[(&a[..], &a[..])]);
        assert_eq!((same.cosine, same.rel_l2, same.sign_agree), (1.0, 0.0, 1.0));
        let neg = [-1.0f64, 2.0, 0.0];
        let opp = Agreement::of(&[(&neg[..], &a[..])]);
        assert!((opp.cosine + 1.0).abs() < 1e-12);
        assert_eq!(opp.sign_agree, 0.0);
        assert!((opp.rel_l2 - 2.0).abs() < 1e-12);
        let z = [0.0f64; 3];
        let zz = Agreement::of(&[(&z[..], &z[..])]);
        assert_eq!((zz.cosine, zz.rel_l2, zz.sign_agree), (1.0, 0.0, 1.0));
        let oz = Agreement::of(&[(&a[..], &z[..])]);
        assert_eq!(oz.cosine, 0.0);
        assert!(oz.rel_l2.is_infinite());
        assert_eq!(num(oz.rel_l2), "null");
    }

    #[test]
    fn firing_fractions_come_from_the_histogram() {
        let f = Firing {
            layer: "sn".into(),
            kind: "EmpfV1".into(),
            trajectories: 10,
            hist: vec![2, 3, 0, 5],
        };
        assert_eq!(f.always(), 0.5);
        assert_eq!(f.silent(), 0.2);
        assert!((f.mixed() - 0.3).abs() < 1e-12);
        assert!((f.rate() - (3.0 + 15.0) / 30.0).abs() < 1e-12);
    }
}
