//! `plan`: the memory plan of a `generate`, `chat`, `sqa-predict`, `stage1` or `stage2` run,
//! printed before anything is loaded (the same plan those commands check before they load).

use std::path::Path;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};
use llava::plan::MemoryPlan;
use llava_trainer::Stage;

use crate::eval_cmds::{ChatArgs, SqaPredictArgs};
use crate::model_cmds::GenerateArgs;
use crate::train_cmds::StageArgs;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Print the plan as JSON (held entries, phases, peak, capacity).
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub run: PlannedRun,
}

/// The run to plan, with the arguments it takes.
#[derive(Subcommand, Debug)]
pub enum PlannedRun {
    Generate(GenerateArgs),
    Chat(ChatArgs),
    SqaPredict(SqaPredictArgs),
    Stage1(StageArgs),
    Stage2(StageArgs),
}

pub fn plan(args: PlanArgs, root: &Path) -> Result<()> {
    let (plan, alternatives) = match &args.run {
        PlannedRun::Generate(a) => llava::with_backend!(a.model.backend, generate_plan(a))?,
        PlannedRun::Chat(a) => llava::with_backend!(a.model.backend, chat_plan(a))?,
        PlannedRun::SqaPredict(a) => llava::with_backend!(a.model.backend, sqa_plan(a))?,
        PlannedRun::Stage1(a) => llava::with_backend!(a.backend, stage_plan(a, Stage::One, root))?,
        PlannedRun::Stage2(a) => llava::with_backend!(a.backend, stage_plan(a, Stage::Two, root))?,
    };
    if args.json {
        let mut json = serde_json::to_value(&plan)?;
        json["peak"] = plan.peak().into();
        json["peak_phase"] = plan.peak_phase().map(|p| p.name.clone()).into();
        json["fits"] = plan.check(&alternatives).is_ok().into();
        json["alternatives"] =
            alternatives.iter().map(|(what, peak)| serde_json::json!({"what": what, "peak": peak})).collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", plan.render());
        for (what, peak) in &alternatives {
            println!("  with {what}: peak {}", llava::plan::human(*peak));
        }
        if let Err(e) = plan.check(&alternatives) {
            println!("\n{e}");
        }
    }
    Ok(())
}

type Planned = (MemoryPlan, Vec<(String, u64)>);

fn generate_plan<B: Backend>(device: &B::Device, a: &GenerateArgs) -> Result<Planned> {
    a.model.plan::<B>(device, &|_| a.shape(), None)
}

fn chat_plan<B: Backend>(device: &B::Device, a: &ChatArgs) -> Result<Planned> {
    a.model.plan::<B>(device, &|c| a.shape(c), None)
}

fn sqa_plan<B: Backend>(device: &B::Device, a: &SqaPredictArgs) -> Result<Planned> {
    let questions = llava_eval::predict::read_questions(&a.questions)?;
    a.model.plan::<B>(device, &|_| a.shape(&questions), Some("--batch-size"))
}

fn stage_plan<B: Backend>(device: &B::Device, a: &StageArgs, stage: Stage, root: &Path) -> Result<Planned> {
    let cfg = a.recipe(stage, root)?;
    Ok(llava_trainer::run::plan_run::<Autodiff<B>>(&cfg, device, a.memory.capacity(a.backend))?)
}
