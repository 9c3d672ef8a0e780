//! `empf recipes`, `empf train --recipe NAME` and the model lookup of `empf info`.

use super::{Cli, TrainArgs};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, Parallel, SecaMode, Stem, zoo};
use crate::recipes::{self, Recipe};
use clap::{Args, CommandFactory};
use std::collections::HashSet;

/// `empf recipes`.
#[derive(Args, Debug)]
pub struct RecipesArgs {
    /// Show one recipe in full (model configuration and hyper-parameters).
    pub name: Option<String>,
}

/// Run `empf recipes`.
pub fn run(a: RecipesArgs) -> Result<()> {
    match a.name {
        None => print!("{}", recipes::table()),
        Some(n) => print!("{}", describe(&recipes::find(&n)?)),
    }
    Ok(())
}

/// A recipe in full: hyper-parameters and the model configuration text.
pub fn describe(r: &Recipe) -> String {
    format!(
        "recipe {}: {}\ndataset {}{}\naugment {}\nepochs {}  batch {}  SGD lr {} momentum {} (Nesterov) wd {} cosine\npaper top-1 {:.2}%{}\nmodel:\n{}",
        r.name,
        r.about,
        r.dataset,
        r.image_size
            .map_or(String::new(), |s| format!(" (images {s}x{s})")),
        r.augment,
        r.epochs,
        r.batch,
        r.lr,
        r.momentum,
        r.wd,
        r.paper_acc,
        r.paper_param_mb
            .map_or(String::new(), |m| format!(", Param.(B) {m:.2} MB")),
        r.model.to_text()
    )
}

/// Flags given explicitly on the command line of `empf train` (`None` when the process arguments
/// are not an `empf train` command line, e.g. when called from a test).
fn explicit_train_flags() -> Option<HashSet<String>> {
    let m = Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()?;
    let (name, sub) = m.subcommand()?;
    if name != "train" {
        return None;
    }
    Some(
        sub.ids()
            .filter(|id| {
                sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.to_string())
            .collect(),
    )
}

/// `a` with the recipe's values filled in where no flag was given explicitly (`explicit(field)`).
pub fn apply(mut a: TrainArgs, r: &Recipe, explicit: &dyn Fn(&str) -> bool) -> TrainArgs {
    if !explicit("arch") {
        a.arch = r.model.arch.clone();
    }
    if !explicit("neuron") {
        a.neuron = r.model.neuron.name().to_string();
    }
    if !explicit("steps") {
        a.steps = Some(r.model.steps);
    }
    if !explicit("widths") {
        a.widths = Some(r.model.widths.clone());
    }
    if !explicit("epochs") {
        a.epochs = Some(r.epochs);
    }
    if !explicit("batch") {
        a.batch = r.batch;
    }
    if !explicit("lr") {
        a.lr = Some(r.lr);
    }
    if !explicit("optim") {
        a.optim = "sgd".into();
    }
    if !explicit("momentum") {
        a.momentum = r.momentum;
    }
    if !explicit("no_nesterov") {
        a.no_nesterov = false;
    }
    if !explicit("wd") {
        a.wd = r.wd;
    }
    if !explicit("no_cosine") {
        a.no_cosine = false;
    }
    if !explicit("augment") {
        a.augment = Some(r.augment.to_string());
    }
    if !explicit("image_size") && r.image_size.is_some() {
        a.image_size = r.image_size;
    }
    // a bare `--data PATH` reads the recipe's dataset kind
    if let Some(d) = &a.data {
        let bare = matches!(
            crate::data::spec::DataSpec::parse(d),
            Ok(crate::data::spec::DataSpec {
                kind: crate::data::spec::DataKind::Mnist,
                ..
            })
        ) && !d.starts_with("mnist:");
        if bare && r.dataset != "mnist" {
            a.data = Some(format!("{}:{d}", r.dataset));
        }
    }
    if !explicit("seca") {
        a.seca = Some(r.model.opts.seca.name().to_string());
    }
    if !explicit("stem") {
        a.stem = Some(r.model.opts.stem.name().to_string());
    }
    if !explicit("parallel") {
        a.parallel = Some(r.model.opts.parallel.name().to_string());
    }
    a
}

/// `empf train` arguments with `--recipe` applied (unchanged without it). Explicit flags win; when
/// the process arguments cannot tell which flags were explicit, a value differing from the flag's
/// default counts as explicit.
pub fn with_recipe(a: TrainArgs) -> Result<TrainArgs> {
    let Some(name) = a.recipe.clone() else {
        return Ok(a);
    };
    let r = recipes::find(&name)?;
    let given = explicit_train_flags();
    let d = TrainArgs::parse_default(&a.arch);
    let differs = |f: &str| match f {
        "arch" => a.arch != "small",
        "neuron" => a.neuron != d.neuron,
        "steps" => a.steps.is_some(),
        "widths" => a.widths.is_some(),
        "epochs" => a.epochs.is_some(),
        "batch" => a.batch != d.batch,
        "lr" => a.lr.is_some(),
        "optim" => a.optim != d.optim,
        "momentum" => a.momentum != d.momentum,
        "no_nesterov" => a.no_nesterov,
        "wd" => a.wd != d.wd,
        "no_cosine" => a.no_cosine,
        "augment" => a.augment.is_some(),
        "image_size" => a.image_size.is_some(),
        "seca" => a.seca.is_some(),
        "stem" => a.stem.is_some(),
        "parallel" => a.parallel.is_some(),
        _ => false,
    };
    let explicit = |f: &str| match &given {
        Some(set) => set.contains(f),
        None => differs(f),
    };
    if a.data.is_none() {
        return Err(Error::Config(format!(
            "recipe `{name}` trains on {}: give --data {}:PATH (or --data PATH)",
            r.dataset, r.dataset
        )));
    }
    Ok(apply(a.clone(), &r, &explicit))
}

/// Apply the architecture options of `empf train` (`--seca`, `--stem`, `--parallel`) to `m`.
pub fn apply_arch_options(a: &TrainArgs, m: &mut ModelConfig) -> Result<()> {
    if let Some(s) = &a.seca {
        m.opts.seca = SecaMode::parse(s)?;
    }
    if let Some(s) = &a.stem {
        m.opts.stem = Stem::parse(s)?;
    }
    if let Some(s) = &a.parallel {
        m.opts.parallel = Parallel::parse(s)?;
    }
    Ok(())
}

/// The model `empf info NAME` shows for a name that is not a file: a recipe's network, or an
/// architecture's default configuration (with the paper's neuron version for that architecture).
pub fn info_model(name: &str) -> Result<(ModelConfig, Option<Recipe>)> {
    if let Ok(r) = recipes::find(name) {
        return Ok((r.model.clone(), Some(r)));
    }
    zoo::named_config(name).map(|m| (m, None)).map_err(|_| {
        let names: Vec<&str> = recipes::all().iter().map(|r| r.name).collect();
        Error::Config(format!(
            "`{name}` is neither a file, an architecture ({}) nor a recipe ({})",
            zoo::ARCHS.join(", "),
            names.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NeuronKind;
    use clap::Parser;

    fn args(argv: &[&str]) -> TrainArgs {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: TrainArgs,
        }
        W::parse_from(std::iter::once("empf").chain(argv.iter().copied())).a
    }

    #[test]
    fn recipe_values_are_defaults_that_explicit_flags_override() {
        let r = recipes::find("dvscifar10-vggsnn").unwrap();
        let mut a = TrainArgs::parse_default("small");
        a.batch = 8;
        a.lr = Some(0.5);
        let b = apply(a, &r, &|f| f == "batch" || f == "lr");
        assert_eq!((b.batch, b.lr), (8, Some(0.5)));
        assert_eq!(b.arch, "vgg-snn");
        assert_eq!(b.neuron, "v2");
        assert_eq!((b.steps, b.epochs), (Some(10), Some(300)));
        assert_eq!(b.augment.as_deref(), Some("flip,roll:5"));
        let mut m = super::super::model_config(&b).unwrap();
        apply_arch_options(&b, &mut m).unwrap();
        assert_eq!(m.arch, "vgg-snn");
        assert_eq!(m.neuron, NeuronKind::V2);
    }

    #[test]
    fn with_recipe_keeps_flags_that_differ_from_their_defaults() {
        // not an `empf train` command line: explicitness is judged against the defaults
        let mut a = args(&[
            "--recipe",
            "cifar10-resnet18-seca",
            "--data",
            "cifar10:x",
            "-T",
            "2",
        ]);
        let b = with_recipe(a.clone()).unwrap();
        assert_eq!(b.steps, Some(2));
        assert_eq!(b.arch, "resnet18");
        assert_eq!(b.seca.as_deref(), Some("ii"));
        let m = super::super::model_config(&b).unwrap();
        assert_eq!(m.opts.seca, SecaMode::II);
        assert_eq!(m.neuron, NeuronKind::V2);
        // no data: a clear error naming the dataset kind
        a.data = None;
        let e = with_recipe(a.clone()).unwrap_err().to_string();
        assert!(e.contains("cifar10:PATH"), "{e}");
        a.recipe = Some("nope".into());
        assert!(with_recipe(a).is_err());
    }

    #[test]
    fn recipe_supplies_dataset_kind_and_image_size() {
        // a bare path takes the recipe's dataset kind; the folder recipe's image side applies
        let b = with_recipe(args(&[
            "--recipe",
            "imagenet200-vgg13",
            "--data",
            "/d/tiny",
        ]))
        .unwrap();
        assert_eq!(b.data.as_deref(), Some("folder:/d/tiny"));
        assert_eq!(b.image_size, Some(64));
        assert!(
            b.augment
                .as_deref()
                .unwrap()
                .contains("autoaugment:imagenet")
        );
        // an explicit kind and an explicit image size win
        let b = with_recipe(args(&[
            "--recipe",
            "imagenet200-vgg13",
            "--data",
            "npz:/d/x.npz",
            "--image-size",
            "32",
        ]))
        .unwrap();
        assert_eq!(b.data.as_deref(), Some("npz:/d/x.npz"));
        assert_eq!(b.image_size, Some(32));
        let b = with_recipe(args(&["--recipe", "cifar10-resnet18", "--data", "d/c10"])).unwrap();
        assert_eq!(b.data.as_deref(), Some("cifar10:d/c10"));
        assert_eq!(b.image_size, None);
    }

    #[test]
    fn info_resolves_recipes_and_architectures() {
        assert_eq!(info_model("cifar100-resnet18").unwrap().0.classes, 100);
        assert_eq!(info_model("vgg-snn").unwrap().0.neuron, NeuronKind::V2);
        assert!(
            info_model("resnet99")
                .unwrap_err()
                .to_string()
                .contains("recipe")
        );
    }
}
