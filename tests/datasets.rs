//! The data pipeline end to end: `empf train --data KIND:PATH --augment ...` on small fixtures
//! written by the test (CIFAR-10 binary records, N-MNIST recordings), runs being reproducible
//! with the background loader, and (optionally) the real CIFAR-10 JPEG archive read as class
//! folders.

use clap::Parser;
use empf::cli::{Cli, run};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("empf-datasets-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// CIFAR-10 binary files with `per` records each; image of class `l` is bright in channel `l % 3`.
fn write_cifar10(dir: &Path, per: usize) {
    let rec = |i: usize| {
        let l = (i % 10) as u8;
        let mut v = vec![l];
        for c in 0..3 {
            v.extend((0..1024).map(|p| {
                if c == usize::from(l) % 3 {
                    200 - (p % 50) as u8
                } else {
                    ((p * 7 + i) % 60) as u8
                }
            }));
        }
        v
    };
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..per).flat_map(|i| rec(i + b * per)).collect();
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let bytes: Vec<u8> = (0..per).flat_map(rec).collect();
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
}

fn train(args: &[&str]) {
    let mut v = vec!["empf", "train"];
    v.extend_from_slice(args);
    run(Cli::try_parse_from(v).unwrap()).unwrap();
}

#[test]
fn augmented_cifar_training_runs_and_is_reproducible_with_the_background_loader() {
    let d = tmp("cifar");
    write_cifar10(&d, 16);
    let data = format!("cifar10:{}", d.display());
    let mut models = Vec::new();
    for k in 0..2 {
        let out = d.join(format!("run{k}"));
        train(&[
            "--data",
            &data,
            "--augment",
            "autoaugment:cifar10,crop:4,flip,normalize:cifar10,cutout:8,mixup:0.2,cutmix:1.0",
            "--widths",
            "4,6,8",
            "-T",
            "2",
            "--epochs",
            "2",
            "--batch",
            "16",
            "--seed",
            "3",
            "-q",
            "--out",
            out.to_str().unwrap(),
        ]);
        models.push(std::fs::read(out.join("model.npz")).unwrap());
    }
    assert!(
        models[0] == models[1],
        "same seed must give the same weights"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn nmnist_event_frames_train_through_the_cli() {
    let sample = Path::new("../shared/data/events/nmnist-sample.bin");
    if !sample.exists() {
        eprintln!("skipping: {} not found", sample.display());
        return;
    }
    let bytes = std::fs::read(sample).unwrap();
    let d = tmp("nmnist");
    for split in ["Train", "Test"] {
        for c in ["0", "1"] {
            let dir = d.join(split).join(c);
            std::fs::create_dir_all(&dir).unwrap();
            for k in 0..3 {
                // class 1: the recording with x mirrored
                let mut b = bytes.clone();
                if c == "1" {
                    for r in b.chunks_exact_mut(5) {
                        r[0] = 33 - r[0];
                    }
                }
                std::fs::write(dir.join(format!("{k}.bin")), &b).unwrap();
            }
        }
    }
    let out = d.join("run");
    train(&[
        "--data",
        &format!("nmnist:{}", d.display()),
        "--augment",
        "roll:2",
        "--frames-by",
        "time",
        "--image-size",
        "17",
        "--widths",
        "4,6,8",
        "-T",
        "3",
        "--epochs",
        "1",
        "--batch",
        "3",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("model.npz").exists());
    let e = Cli::try_parse_from(["empf", "train", "--data", "svhn:/x"])
        .map(run)
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown dataset kind"), "{e}");
    let e = Cli::try_parse_from(["empf", "train", "--augment", "blur"])
        .map(run)
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown augmentation"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn real_cifar10_jpeg_archive_reads_as_class_folders() {
    let archive = Path::new("../shared/data/cifar10-jpeg.tar.gz");
    if !archive.exists() {
        eprintln!("skipping: {} not found", archive.display());
        return;
    }
    let d = tmp("jpeg");
    // a few test images per class, extracted with the system tar
    let ok = std::process::Command::new("tar")
        .args(["xzf", archive.to_str().unwrap(), "-C", d.to_str().unwrap()])
        .args(["--wildcards", "test/*/000[0-4].jpg"])
        .status();
    match ok {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("skipping: tar could not extract the archive ({other:?})");
            return;
        }
    }
    let f = empf::data::folder::load_folder(d.join("test"), 3, 32).unwrap();
    assert_eq!(f.classes.len(), 10);
    let mut sorted = empf::data::cifar::CIFAR10_CLASSES.to_vec();
    sorted.sort();
    assert_eq!(f.classes, sorted);
    assert!(f.data.len() >= 10);
    assert_eq!(f.data.shape(), [3, 32, 32]);
    // real photos: pixels vary
    let img = f.data.image(0).unwrap();
    assert!(img.iter().max() > img.iter().min());
    std::fs::remove_dir_all(&d).unwrap();
}
