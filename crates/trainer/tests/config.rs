//! Recipe configs carry the reference hyperparameters; overrides and metrics/plot outputs work.

use std::path::{Path, PathBuf};

use llava_trainer::Stage;
use llava_trainer::config::RunConfig;
use llava_trainer::metrics::{MetricsWriter, StepMetrics, plot_loss_curve, read_metrics};

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn recipes_have_the_reference_hyperparameters() {
    // (file, stage, lr, global batch, epochs, template, projector) from the spec §7.
    let expected = [
        ("llava-13b-stage1", Stage::One, 2e-3, 128, 1.0, "v0", "linear"),
        ("llava-7b-stage1", Stage::One, 2e-3, 128, 1.0, "v0", "linear"),
        ("llava-13b-stage2-chatbot", Stage::Two, 2e-5, 32, 3.0, "v0", "linear"),
        ("llava-13b-scienceqa", Stage::Two, 2e-5, 32, 12.0, "v1", "linear"),
        ("llava-v1.5-7b-stage1", Stage::One, 1e-3, 256, 1.0, "plain", "mlp2x_gelu"),
        ("llava-v1.5-7b-stage2", Stage::Two, 2e-5, 128, 1.0, "v1", "mlp2x_gelu"),
        ("llava-v1.5-7b-lora", Stage::Two, 2e-4, 128, 1.0, "v1", "mlp2x_gelu"),
    ];
    for (name, stage, lr, global, epochs, template, projector) in expected {
        let c = RunConfig::load(&configs().join(format!("{name}.toml")), &[]).unwrap();
        assert_eq!(
            (c.stage, c.training.learning_rate, c.training.global_batch_size, c.training.epochs),
            (stage, lr, global, epochs),
            "{name}"
        );
        assert_eq!((c.data.template.as_str(), c.model.projector_type.as_str()), (template, projector), "{name}");
        assert_eq!((c.training.warmup_ratio, c.training.weight_decay, c.model.select_layer), (0.03, 0.0, -2), "{name}");
        assert_eq!(c.training.model_max_length, 2048, "{name}");
        assert!(llava_data::conversation::conv_template(&c.data.template).is_some());
    }
    // finetune_lora.sh: r 128, α 256, dropout 0.05, bias none, projector at 2e-5, float base.
    let c = RunConfig::load(&configs().join("llava-v1.5-7b-lora.toml"), &[]).unwrap();
    let lora = c.lora_enabled().expect("LoRA on");
    assert_eq!((lora.r, lora.alpha, lora.dropout, lora.bias.as_str()), (128, 256.0, 0.05, "none"));
    assert_eq!((c.training.mm_projector_lr, lora.quantize()), (Some(2e-5), Ok(None)));
    assert_eq!(lora.peft_config().target_modules.len(), 7, "every linear layer of the LLM but the head");
    // QLoRA (finetune_qlora.sh's --bits 4, nf4) from the command line; bad settings are named.
    let q = RunConfig::load(&configs().join("llava-v1.5-7b-lora.toml"), &["lora.bits=4".into()]).unwrap();
    assert_eq!(q.lora_enabled().unwrap().quantize(), Ok(Some(llava::QuantFormat::Nf4)));
    for (set, field) in [
        ("lora.bits=3", "lora.bits"),
        ("lora.quant_type=\"fp4\"", "lora.quant_type"),
        ("lora.r=0", "r must"),
        ("lora.dropout=1.5", "lora_dropout"),
        ("lora.bias=\"all\"", "bias"),
    ] {
        let err = RunConfig::load(&configs().join("llava-v1.5-7b-lora.toml"), &[set.into()]).unwrap_err().to_string();
        assert!(err.contains(field), "{set}: {err}");
    }
    // `--set lora.enable=true` on a recipe without a [lora] section: the reference's defaults.
    let c = RunConfig::load(&configs().join("llava-v1.5-7b-stage2.toml"), &["lora.enable=true".into()]).unwrap();
    assert_eq!(c.lora_enabled().map(|l| (l.r, l.alpha, l.bits)), Some((128, 256.0, 16)));
    let err =
        RunConfig::load(&configs().join("llava-v1.5-7b-stage2.toml"), &["lora.bits=4".into()]).unwrap_err().to_string();
    assert!(err.contains("lora.enable"), "a quantized LLM without LoRA: {err}");

    // 558K samples at 256 per step on 8 GPUs × 32: 2,181 steps without accumulation.
    let c = RunConfig::load(&configs().join("llava-v1.5-7b-stage1.toml"), &[]).unwrap();
    let o = c.optim(558_128, 8);
    assert_eq!((o.total_steps, o.gradient_accumulation_steps), (2181, 1));
    assert_eq!(c.optim(558_128, 1).gradient_accumulation_steps, 8);
    assert_eq!((o.adam_beta1, o.adam_beta2, o.adam_epsilon, o.weight_decay), (0.9, 0.999, 1e-8, 0.0));
}

#[test]
fn every_field_can_be_overridden_and_the_resolved_config_round_trips() {
    let path = configs().join("llava-v1.5-7b-stage2.toml");
    let c = RunConfig::load(
        &path,
        &["training.learning_rate=1e-4".into(), "data.template=llava_llama_2".into(), "name=my-run".into()],
    )
    .unwrap();
    assert_eq!(
        (c.training.learning_rate, c.data.template.as_str(), c.name.as_str()),
        (1e-4, "llava_llama_2", "my-run")
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("resolved.toml"), c.to_toml()).unwrap();
    assert_eq!(RunConfig::load(&tmp.path().join("resolved.toml"), &[]).unwrap(), c);
    let err = RunConfig::load(&path, &["nosuch.field=1".into()]).unwrap_err().to_string();
    assert!(err.contains("nosuch"), "{err}");
    let err = RunConfig::load(&path, &["training.learning_rate=fast".into()]).unwrap_err().to_string();
    assert!(err.contains("learning_rate"), "{err}");
}

#[test]
fn metrics_are_appended_and_the_loss_curve_is_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let lines: Vec<StepMetrics> = (0..5)
        .map(|s| StepMetrics {
            step: s,
            loss: 3.0 - s as f64 * 0.5,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 100.0,
            val_loss: None,
        })
        .collect();
    for chunk in lines.chunks(3) {
        // A second writer (a resumed run) appends to the same file.
        let mut w = MetricsWriter::open(&path).unwrap();
        for m in chunk {
            w.write(m).unwrap();
        }
    }
    assert_eq!(read_metrics(&path).unwrap(), lines);
    let png = tmp.path().join("loss.png");
    let points: Vec<(f64, f64)> = lines.iter().map(|m| (m.step as f64, m.loss)).collect();
    plot_loss_curve(&png, &points, &[], 320, 200).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (320, 200));
    let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
    assert!(blue > 100, "the curve is drawn ({blue} pixels)");
}

#[test]
fn values_a_run_cannot_use_are_refused_naming_the_field() {
    let path = configs().join("llava-v1.5-7b-stage2.toml");
    for (set, field) in [
        ("training.per_device_batch_size=0", "per_device_batch_size"),
        ("training.global_batch_size=0", "global_batch_size"),
        ("training.model_max_length=0", "model_max_length"),
        ("training.epochs=nan", "epochs"),
        ("training.learning_rate=-1.0", "learning_rate"),
        ("training.warmup_ratio=2.0", "warmup_ratio"),
        ("training.max_grad_norm=inf", "max_grad_norm"),
    ] {
        let err = RunConfig::load(&path, &[set.into()]).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("llava-v1.5-7b-stage2.toml"), "{set}: {err}");
    }
}

#[test]
fn unknown_fields_in_a_recipe_or_an_override_are_refused_with_the_nearest_name() {
    let path = configs().join("llava-v1.5-7b-stage2.toml");
    let err = RunConfig::load(&path, &["training.learnin_rate=5".into()]).unwrap_err().to_string();
    assert!(err.contains("training.learnin_rate"), "{err}");
    assert!(err.contains("did you mean `learning_rate`"), "{err}");
    assert!(err.contains("from the override `training.learnin_rate=5`"), "{err}");
    let err = RunConfig::load(&path, &["trainng.seed=1".into()]).unwrap_err().to_string();
    assert!(err.contains("did you mean `training`"), "{err}");

    // The same typo written in the file itself.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&path).unwrap().replace("[checkpoint]", "[checkpoint]\nsave_step = 3");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, text).unwrap();
    let err = RunConfig::load(&typo, &[]).unwrap_err().to_string();
    assert!(err.contains("typo.toml") && err.contains("checkpoint.save_step"), "{err}");
    assert!(err.contains("did you mean `save_steps`"), "{err}");
}

#[test]
fn recipe_differences_name_each_changed_field() {
    let old: toml::Value = toml::from_str("[training]\nlearning_rate = 0.001\nseed = 1\n[data]\nworkers = 2").unwrap();
    let new: toml::Value =
        toml::from_str("[training]\nlearning_rate = 0.002\nseed = 1\nbf16 = true\n[data]\nworkers = 8").unwrap();
    assert_eq!(
        llava_trainer::config::differences(&old, &new),
        ["training.bf16: (absent) → true", "training.learning_rate: 0.001 → 0.002"],
        "the input pipeline's thread count is not a difference in results"
    );
    assert!(llava_trainer::config::differences(&old, &old).is_empty());
}

#[test]
fn mutated_recipes_and_overrides_load_or_are_named_errors_never_panics() {
    use llava_io::mutations::mutations;
    let path = configs().join("llava-v1.5-7b-stage2.toml");
    let seed = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mutated = dir.path().join("recipe.toml");
    let mut errors = 0;
    for (i, input) in mutations(&seed, 300, 21).into_iter().enumerate() {
        std::fs::write(&mutated, &input).unwrap();
        let outcome = std::panic::catch_unwind(|| RunConfig::load(&mutated, &[]).map(|_| ()));
        match outcome.unwrap_or_else(|_| panic!("mutation {i}: the recipe reader panicked")) {
            Ok(()) => {}
            Err(e) => {
                assert!(e.to_string().contains("recipe.toml"), "mutation {i}: {e}");
                errors += 1;
            }
        }
    }
    assert!(errors > 0 && errors < 300, "{errors}");
    // Overrides: mutations of valid assignments, each alone.
    let assignments = "training.learning_rate=2e-5\ndata.template=\"v1\"\nmodel.select_layer=-2\ncheckpoint.keep=3";
    for (i, input) in mutations(assignments.as_bytes(), 300, 22).into_iter().enumerate() {
        let text = String::from_utf8_lossy(&input).into_owned();
        let overrides: Vec<String> = text.lines().map(String::from).collect();
        let outcome = std::panic::catch_unwind(|| RunConfig::load(&path, &overrides).map(|_| ()));
        assert!(outcome.is_ok(), "override mutation {i} ({overrides:?}): the reader panicked");
    }
}
