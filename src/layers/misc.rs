//! Shape and wiring helpers: [`Flatten`] (`N x C x H x W -> N x CHW`) and the residual addition
//! ([`add`], [`add_backward`]) of the block in EMPF.md §6 ("no neuron after the addition").

use crate::error::{Error, Result};
use crate::layers::{Cache, Layer, Param, State, StepCtx};
use crate::tensor::{Real, Tensor, standard};
use ndarray::IxDyn;

/// `N x d1 x ... x dk -> N x (d1·...·dk)` in row-major order (the NCHW layout is already that order,
/// so no data moves). Backward reshapes `dL/dy` back to the input shape: the map is a bijection of
/// indices, so its Jacobian is a permutation (here the identity on the flat data).
pub struct Flatten {
    name: String,
}

/// Backward needs the input shape.
#[derive(Default)]
pub struct FlattenCache {
    shape: Vec<usize>,
}
crate::impl_cache!(FlattenCache { shape });

impl Flatten {
    /// A flatten layer.
    pub fn new(name: &str) -> Self {
        Flatten {
            name: name.to_string(),
        }
    }
}

impl<R: Real> Layer<R> for Flatten {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() < 2 || input.contains(&0) {
            return Err(Error::shape(
                &self.name,
                "expected an N x ... tensor of rank at least 2 with no empty axis",
                input,
            ));
        }
        Ok(vec![input[0], input[1..].iter().product()])
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = <Self as Layer<R>>::output_shape(self, x.shape())?;
        if let Some(c) = cache {
            let s = &mut c.get_or_default::<FlattenCache>().shape;
            s.clear();
            s.extend_from_slice(x.shape());
        }
        reshape(&self.name, standard(x.clone()), &out)
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let shape = &cache.get::<FlattenCache>(&self.name)?.shape;
        let out = <Self as Layer<R>>::output_shape(self, shape)?;
        if dy.shape() != out.as_slice() {
            return Err(Error::shape(
                &self.name,
                format!("output gradient of shape {out:?}"),
                dy.shape(),
            ));
        }
        reshape(&self.name, standard(dy.clone()), shape)
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

fn reshape<R: Real>(layer: &str, t: Tensor<R>, shape: &[usize]) -> Result<Tensor<R>> {
    let got = t.shape().to_vec();
    t.into_shape_with_order(IxDyn(shape))
        .map_err(|_| Error::shape(layer, format!("a tensor reshapeable to {shape:?}"), &got))
}

/// Residual addition `y = a + b` (same shapes; `layer` names the block in errors).
pub fn add<R: Real>(layer: &str, a: &Tensor<R>, b: &Tensor<R>) -> Result<Tensor<R>> {
    check_same(layer, a, b)?;
    Ok(a + b)
}

/// In-place residual addition `a += b` (avoids an allocation when `a` is no longer needed).
pub fn add_assign<R: Real>(layer: &str, a: &mut Tensor<R>, b: &Tensor<R>) -> Result<()> {
    check_same(layer, a, b)?;
    *a += b;
    Ok(())
}

/// Backward of [`add`]: `∂(a + b)/∂a = ∂(a + b)/∂b = I`, so both inputs receive `dy` unchanged.
/// Returns the two copies; a caller that can share `dy` should simply use it for both branches.
pub fn add_backward<R: Real>(dy: &Tensor<R>) -> (Tensor<R>, Tensor<R>) {
    (dy.clone(), dy.clone())
}

fn check_same<R: Real>(layer: &str, a: &Tensor<R>, b: &Tensor<R>) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            format!(
                "residual addition of equal shapes: left operand is {:?}",
                a.shape()
            ),
            b.shape(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use crate::tensor::{from_vec, zeros};
    use proptest::prelude::*;

    fn train() -> StepCtx {
        StepCtx::train(0, 1, GradMode::Online)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn flatten_keeps_row_major_order_and_backward_matches_finite_differences(
            n in 1usize..4, c in 1usize..5, h in 1usize..6, w in 1usize..6, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let mut l = Flatten::new("flat");
            let x = from_vec(&[n, c, h, w], (0..n * c * h * w).map(|_| rng.normal()).collect());
            let y = l.forward(&x, &train(), &mut State::Empty, None).unwrap();
            prop_assert_eq!(y.shape(), &[n, c * h * w][..]);
            prop_assert_eq!(y.as_slice().unwrap(), x.as_slice().unwrap());
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "Flatten");
        }
    }

    #[test]
    fn flatten_takes_non_standard_layout_inputs() {
        // a transposed view flattened must follow its logical (row-major) order
        let x = from_vec(&[2, 3], vec![0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let xt = x.t().to_owned().into_dyn(); // 3 x 2, logical rows [0,3],[1,4],[2,5]
        let xt_view = x.clone().reversed_axes(); // same logical content, Fortran layout
        assert_eq!(xt, xt_view);
        let mut l = Flatten::new("flat");
        let y = l
            .forward(&xt_view, &train(), &mut State::Empty, None)
            .unwrap();
        assert_eq!(
            y.iter().copied().collect::<Vec<_>>(),
            vec![0., 3., 1., 4., 2., 5.]
        );
    }

    #[test]
    fn add_sums_and_backward_copies_the_gradient() {
        let a = from_vec(&[1, 3], vec![1.0f64, 2.0, 3.0]);
        let b = from_vec(&[1, 3], vec![0.5, -2.0, 1.0]);
        let y = add("blk", &a, &b).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[1.5, 0.0, 4.0]);
        let mut c = a.clone();
        add_assign("blk", &mut c, &b).unwrap();
        assert_eq!(c, y);
        // finite differences of <r, a + b> in a and b are r: the backward returns r twice
        let r = from_vec(&[1, 3], vec![0.3, -0.7, 1.1]);
        let (da, db) = add_backward(&r);
        assert_eq!(da, r);
        assert_eq!(db, r);
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_layer() {
        let e = add("block3", &zeros::<f32>(&[2, 3]), &zeros::<f32>(&[2, 4])).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { layer, got, .. } if layer == "block3" && got == &[2, 4]),
            "{e}"
        );
        let mut a = zeros::<f32>(&[2, 3]);
        assert!(add_assign("block4", &mut a, &zeros::<f32>(&[3, 2])).is_err());
        let mut l = Flatten::new("flat7");
        let e = <Flatten as Layer<f32>>::forward(
            &mut l,
            &zeros::<f32>(&[5]),
            &StepCtx::eval(0, 1),
            &mut State::Empty,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("flat7") && e.contains("[5]"), "{e}");
        let mut cache = Cache::new();
        <Flatten as Layer<f32>>::forward(
            &mut l,
            &zeros::<f32>(&[2, 3, 2, 2]),
            &train(),
            &mut State::Empty,
            Some(&mut cache),
        )
        .unwrap();
        let e = <Flatten as Layer<f32>>::backward(
            &mut l,
            &zeros::<f32>(&[2, 11]),
            &train(),
            &cache,
            &mut State::Empty,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { ref layer, .. } if layer == "flat7"));
    }
}
