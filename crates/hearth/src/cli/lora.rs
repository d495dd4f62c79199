//! `hearth lora ...`: LoRA addons loaded onto deployments (DeployedModels).

use anyhow::bail;
use clap::Subcommand;
use hearth_api::Code;
use serde_json::{json, Value};

use super::client::{is_code, Ref};
use super::output::{field, print_list, print_one, short, Column};
use super::wait::{self, Poll, WaitArgs};
use super::Ctx;

const COLLECTION: &str = "deployedModels";

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Load an addon model onto a deployment; --wait waits until it is DEPLOYED.
    Load {
        /// The addon model (id or name).
        model: String,
        /// The deployment to load it onto (id or name).
        #[arg(long)]
        deployment: String,
        /// Make this deployment the one requests for the plain model name go to.
        #[arg(long)]
        default: bool,
        /// For a deployment with enableHotReloadLatestAddon: replace the addon it has.
        #[arg(long)]
        replace_merged_addon: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Unload an addon; --wait waits until it is gone.
    ///
    /// Name the deployed model (its id or name), or the addon model with --deployment.
    Unload {
        /// The deployed model (id or name), or with --deployment the addon model.
        target: String,
        /// The deployment to unload the addon model from.
        #[arg(long)]
        deployment: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show a loaded addon.
    Get {
        /// The deployed model (id or name).
        deployed_model: String,
    },
    /// List loaded addons.
    List {
        /// Only those on this deployment.
        #[arg(long)]
        deployment: Option<String>,
    },
}

const COLUMNS: &[Column] = &[
    Column { heading: "ID", cell: |v| short(&field(v, "name")) },
    Column { heading: "MODEL", cell: |v| short(&field(v, "model")) },
    Column { heading: "DEPLOYMENT", cell: |v| short(&field(v, "deployment")) },
    Column { heading: "STATE", cell: |v| field(v, "state") },
    Column { heading: "DEFAULT", cell: |v| if v["default"] == json!(true) { "yes".into() } else { String::new() } },
];

pub async fn run(ctx: &Ctx, cmd: LoraCommand) -> anyhow::Result<()> {
    match cmd {
        LoraCommand::Load { model, deployment, default, replace_merged_addon, wait } => {
            let model = Ref::parse(&model, "models")?.name(&ctx.api, "models").await?;
            let deployment = Ref::parse(&deployment, "deployments")?.name(&ctx.api, "deployments").await?;
            let mut body = json!({"model": model, "deployment": deployment});
            if default {
                body["default"] = json!(true);
            }
            let query = if replace_merged_addon { vec![("replaceMergedAddon", "true".to_string())] } else { vec![] };
            let path = ctx.api.path(COLLECTION).await?;
            let dm = ctx.api.post(&path, &query, &body).await?;
            let dm = if wait.wait {
                let name = dm["name"].as_str().unwrap_or_default().to_string();
                wait_deployed(ctx, &name, &wait).await?
            } else {
                dm
            };
            print_one(ctx.out, &dm);
        }
        LoraCommand::Unload { target, deployment, wait } => {
            let name = match deployment {
                None => Ref::parse(&target, COLLECTION)?.name(&ctx.api, COLLECTION).await?,
                Some(dep) => find(ctx, &target, &dep).await?,
            };
            ctx.api.delete(&format!("/v1/{name}"), &[]).await?;
            if wait.wait {
                wait_gone(ctx, &name, &wait).await?;
            }
            println!("unloaded {name}");
        }
        LoraCommand::Get { deployed_model } => {
            let path = Ref::parse(&deployed_model, COLLECTION)?.path(&ctx.api, COLLECTION, None).await?;
            print_one(ctx.out, &ctx.api.get(&path, &[]).await?);
        }
        LoraCommand::List { deployment } => {
            let mut query = Vec::new();
            if let Some(dep) = deployment {
                let dep = Ref::parse(&dep, "deployments")?.name(&ctx.api, "deployments").await?;
                query.push(("filter", format!("deployment={}", quote(&dep))));
            }
            let path = ctx.api.path(COLLECTION).await?;
            let items = ctx.api.list_all(&path, "deployedModels", &query).await?;
            print_list(ctx.out, &items, COLUMNS);
        }
    }
    Ok(())
}

/// An AIP-160 string literal.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The deployed model that is `model` loaded onto `deployment`.
async fn find(ctx: &Ctx, model: &str, deployment: &str) -> anyhow::Result<String> {
    let model = Ref::parse(model, "models")?.name(&ctx.api, "models").await?;
    let deployment = Ref::parse(deployment, "deployments")?.name(&ctx.api, "deployments").await?;
    let path = ctx.api.path(COLLECTION).await?;
    let filter = format!("model={} AND deployment={}", quote(&model), quote(&deployment));
    let items = ctx.api.list_all(&path, "deployedModels", &[("filter", filter)]).await?;
    match items.first().and_then(|d| d["name"].as_str()) {
        Some(n) => Ok(n.to_string()),
        None => bail!("model {model} is not loaded onto {deployment}"),
    }
}

/// Waits for DEPLOYED. A replica that refused the adapter says why in `status`; the load
/// cannot succeed then, so the wait ends with that reason.
async fn wait_deployed(ctx: &Ctx, name: &str, w: &WaitArgs) -> anyhow::Result<Value> {
    let path = format!("/v1/{name}");
    wait::until(&format!("{name} to be DEPLOYED"), w.timeout, || async {
        let dm = ctx.api.get(&path, &[]).await?;
        let state = field(&dm, "state");
        let code = field(&dm, "status.code");
        if !code.is_empty() && code != "OK" {
            return Ok(Poll::Failed(format!("{name} could not be loaded: {code}: {}", field(&dm, "status.message"))));
        }
        match state.as_str() {
            "DEPLOYED" => Ok(Poll::Done(dm)),
            "UNDEPLOYING" => Ok(Poll::Failed(format!("{name} is being unloaded"))),
            _ => Ok(Poll::Pending(state)),
        }
    })
    .await
}

async fn wait_gone(ctx: &Ctx, name: &str, w: &WaitArgs) -> anyhow::Result<()> {
    let path = format!("/v1/{name}");
    wait::until(&format!("{name} to be unloaded"), w.timeout, || async {
        match ctx.api.get(&path, &[]).await {
            Ok(dm) => Ok(Poll::Pending(field(&dm, "state"))),
            Err(e) if is_code(&e, Code::NotFound) => Ok(Poll::Done(())),
            Err(e) => Err(e),
        }
    })
    .await
}
