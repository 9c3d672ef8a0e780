use empf::layers::{Cache, EmpfV1, GradMode, Layer, State, StepCtx};
use empf::tensor::from_vec;
use std::time::Instant;
fn main() {
    let n = 64 * 32 * 28 * 28;
    let x = from_vec::<f32>(
        &[64, 32, 28, 28],
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect(),
    );
    let mut l = EmpfV1::<f32>::new("sn", 4);
    let mut st = State::Empty;
    let mut c = Cache::new();
    for rep in 0..3 {
        for t in 0..4 {
            let ctx = StepCtx::train(t, 4, GradMode::Online);
            let t0 = Instant::now();
            let y = l.forward(&x, &ctx, &mut st, Some(&mut c)).unwrap();
            let f = t0.elapsed();
            let t0 = Instant::now();
            let mut ds = State::Empty;
            let _dx = l.backward(&y, &ctx, &c, &mut ds).unwrap();
            println!(
                "rep {rep} t {t}: forward {:?} backward {:?}",
                f,
                t0.elapsed()
            );
        }
    }
}
