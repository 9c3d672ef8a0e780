//! Firing rates (share of non-zero spikes) of each EM-PF layer per time-step on 256 bundled MNIST test
//! images: `cargo run --release --example firing_rates [-- model.npz]` (default: mnist-cnn at init).
use empf::layers::{State, StepCtx};
use empf::model::{ModelConfig, zoo};
use empf::rng::Rng;
fn main() -> empf::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (_cfg, mut net) = if let Some(p) = args.first() {
        empf::train::checkpoint::load_model(std::path::Path::new(p))?
    } else {
        let cfg = ModelConfig::mnist_cnn();
        let net = zoo::build::<f32>(&cfg, &mut Rng::new(0))?;
        (cfg, net)
    };
    let m = empf::data::idx::load_mnist(empf::data::bundled_mnist_dir())?;
    let idx: Vec<usize> = (0..256).collect();
    let (x, _) = m.test.batch(&idx)?;
    let steps = 4;
    let n = net.layers.len();
    let mut states: Vec<State<f32>> = (0..n).map(|_| State::Empty).collect();
    for t in 0..steps {
        let ctx = StepCtx::train(t, steps, empf::layers::GradMode::Online);
        let mut h = x.clone();
        let mut line = format!("t={t}:");
        for (i, l) in net.layers.iter_mut().enumerate() {
            h = l.forward(&h, &ctx, &mut states[i], None)?;
            if l.kind().starts_with("Empf") {
                let nz = h.iter().filter(|&&v| v != 0.0).count();
                line += &format!(" {} {:.1}%", l.name(), 100.0 * nz as f64 / h.len() as f64);
            }
        }
        println!("{line}");
    }
    Ok(())
}
