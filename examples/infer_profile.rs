//! Profile the deploy runtime: `cargo run --release --example infer_profile -- [arch|model.npz]
//! [precision] [batch] [reps]` (seeded mnist-cnn by default, on random uniform inputs as `empf bench
//! infer`; a trained checkpoint runs on the bundled MNIST test images). `EMPF_DENSE_Q=always|never`
//! forces the dense or the sparse k-bit convolutions (`empf_simd::DenseQ`).
use empf::infer::{Precision, Runtime, export};
use empf::model::zoo;
// the allocator of the `empf` binary, so the profile is the one `empf bench infer` sees
#[global_allocator]
static GLOBAL: empf_simd::alloc::BlockCache<mimalloc::MiMalloc> = empf_simd::alloc::BlockCache::new(
    mimalloc::MiMalloc,
    empf_simd::alloc::BlockCache::<()>::DEFAULT_CAP,
);
use empf::rng::Rng;
use empf::tensor::from_vec;
use empf::train::step::{StepInput, eval_batch};
use std::time::Instant;
fn main() -> empf::Result<()> {
    empf_simd::alloc::keep_freed_pages();
    match std::env::var("EMPF_DENSE_Q").as_deref() {
        Ok("always") => empf_simd::set_dense_q(empf_simd::DenseQ::Always),
        Ok("never") => empf_simd::set_dense_q(empf_simd::DenseQ::Never),
        _ => {}
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args.first().map(String::as_str).unwrap_or("mnist-cnn");
    let prec = args.get(1).map(String::as_str).unwrap_or("float");
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let trained = std::path::Path::new(arch).exists();
    let (cfg, mut net) = if trained {
        empf::train::checkpoint::load_model(std::path::Path::new(arch))?
    } else {
        let cfg = zoo::named_config(arch)?;
        let net = zoo::build::<f32>(&cfg, &mut Rng::new(0))?;
        (cfg, net)
    };
    let model = export(&cfg, &net)?;
    let x = if trained {
        let test = empf::data::idx::load_mnist(empf::data::bundled_mnist_dir())?.test;
        test.batch(&(0..batch).collect::<Vec<_>>())?.0
    } else {
        let mut rng = Rng::new(1);
        let len = batch * cfg.input.iter().product::<usize>();
        from_vec(
            &[batch, cfg.input[0], cfg.input[1], cfg.input[2]],
            (0..len).map(|_| rng.uniform() as f32).collect(),
        )
    };
    let t0 = Instant::now();
    if prec == "eval" {
        for _ in 0..reps {
            eval_batch(&mut net, StepInput::Static(&x), cfg.steps)?;
        }
    } else {
        let mut rt = Runtime::new(
            model,
            Precision::parse(prec)?,
            None,
            empf_simd::Simd::global(),
        )?;
        for _ in 0..reps {
            rt.run(&x)?;
        }
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{arch} {prec} batch {batch}: {:.3} ms per call, {:.1} img/s",
        dt * 1e3,
        batch as f64 / dt
    );
    Ok(())
}
