//! `hearth deployment ...`: Deployments.

use anyhow::bail;
use clap::Subcommand;
use hearth_api::Code;
use serde_json::{json, Map, Value};

use super::client::{is_code, Ref};
use super::models::ListArgs;
use super::output::{field, print_list, print_one, short, Column};
use super::wait::{self, Poll, WaitArgs};
use super::Ctx;

const COLLECTION: &str = "deployments";

#[derive(Subcommand)]
pub enum DeploymentCommand {
    /// Deploy a base model; --wait waits until it is READY.
    Create(CreateArgs),
    /// Show a deployment.
    Get {
        /// Deployment id or name (accounts/ACCOUNT/deployments/ID).
        deployment: String,
    },
    /// List deployments.
    List {
        #[command(flatten)]
        list: ListArgs,
        /// Include deleted deployments not purged yet.
        #[arg(long)]
        show_deleted: bool,
    },
    /// Change a deployment; --wait waits until it is READY again.
    Update(UpdateArgs),
    /// Delete a deployment; --wait waits until its replicas are stopped.
    ///
    /// A deleted deployment can be undeleted until it is purged; --hard removes it at once
    /// (--wait then waits until it is gone).
    Delete {
        /// Deployment id or name.
        deployment: String,
        /// Remove it at once instead of keeping it DELETED until its purge time.
        #[arg(long)]
        hard: bool,
        /// Delete it even with LoRA addons loaded (they are unloaded with it).
        #[arg(long)]
        ignore_checks: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Bring back a DELETED or FAILED deployment; --wait waits until it is READY.
    Undelete {
        /// Deployment id or name.
        deployment: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Set the number of replicas; --wait waits until that many are ready.
    Scale {
        /// Deployment id or name.
        deployment: String,
        /// The replica count (0 to maxReplicaCount).
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
        replica_count: i32,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// The fields create and update set.
#[derive(clap::Args)]
pub struct Spec {
    /// A human-readable name.
    #[arg(long)]
    display_name: Option<String>,
    /// A description.
    #[arg(long)]
    description: Option<String>,
    /// The fewest replicas it runs (0: it sleeps when idle and wakes on a request).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    min_replica_count: Option<i32>,
    /// The most replicas it runs.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    max_replica_count: Option<i32>,
    /// Allow LoRA addons to be loaded onto it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    enable_addons: Option<bool>,
    /// Compute precision: FP32, BF16 or FP16.
    #[arg(long)]
    precision: Option<String>,
    /// Prompt-lookup speculation: the longest n-gram looked up (0: off).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    ngram_speculation_length: Option<i32>,
    /// A draft model (id or name) with the base model's tokenizer, proposing tokens the base
    /// model verifies; "" for none.
    #[arg(long)]
    draft_model: Option<String>,
    /// The most tokens one speculation drafts.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    draft_token_count: Option<i32>,
    /// Hot load: the bucket whose folders are versions of the weights (file:///dir or
    /// s3://bucket/prefix); "" turns hot load off.
    #[arg(long)]
    hot_load_bucket_url: Option<String>,
    /// Hot load: the version (a folder of the bucket) to serve, swapped in without a restart.
    #[arg(long)]
    target_model_version: Option<String>,
}

impl Spec {
    fn to_json(&self) -> (Map<String, Value>, Vec<&'static str>) {
        let mut m = Map::new();
        let mut mask = Vec::new();
        let mut set = |k: &'static str, v: Value| {
            m.insert(k.to_string(), v);
            mask.push(k);
        };
        if let Some(v) = &self.display_name {
            set("displayName", json!(v));
        }
        if let Some(v) = &self.description {
            set("description", json!(v));
        }
        if let Some(v) = self.min_replica_count {
            set("minReplicaCount", json!(v));
        }
        if let Some(v) = self.max_replica_count {
            set("maxReplicaCount", json!(v));
        }
        if let Some(v) = self.enable_addons {
            set("enableAddons", json!(v));
        }
        if let Some(v) = &self.precision {
            set("precision", json!(v.to_ascii_uppercase()));
        }
        if let Some(v) = self.ngram_speculation_length {
            set("ngramSpeculationLength", json!(v));
        }
        if let Some(v) = &self.draft_model {
            set("draftModel", json!(v));
        }
        if let Some(v) = self.draft_token_count {
            set("draftTokenCount", json!(v));
        }
        if let Some(v) = &self.hot_load_bucket_url {
            set("enableHotLoad", json!(!v.is_empty()));
            set("hotLoadBucketUrl", json!(v));
        }
        match (&self.target_model_version, &self.hot_load_bucket_url) {
            (Some(v), _) => set("targetModelVersion", json!(v)),
            // Hot load turned off takes its target with it.
            (None, Some(url)) if url.is_empty() => set("targetModelVersion", json!("")),
            _ => {}
        }
        (m, mask)
    }
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The base model to deploy (id or name).
    base_model: String,
    /// The deployment's id; the server picks one when unset.
    #[arg(long)]
    deployment_id: Option<String>,
    #[command(flatten)]
    spec: Spec,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// Deployment id or name.
    deployment: String,
    #[command(flatten)]
    spec: Spec,
    #[command(flatten)]
    wait: WaitArgs,
}

const COLUMNS: &[Column] = &[
    Column { heading: "ID", cell: |v| short(&field(v, "name")) },
    Column { heading: "BASE MODEL", cell: |v| short(&field(v, "baseModel")) },
    Column { heading: "STATE", cell: |v| field(v, "state") },
    Column {
        heading: "REPLICAS",
        cell: |v| format!("{}/{}", count(v, "replicaCount"), count(v, "desiredReplicaCount")),
    },
    Column { heading: "MIN-MAX", cell: |v| format!("{}-{}", count(v, "minReplicaCount"), count(v, "maxReplicaCount")) },
    Column { heading: "ADDONS", cell: |v| if v["enableAddons"] == json!(true) { "yes".into() } else { String::new() } },
    Column { heading: "CREATED", cell: |v| field(v, "createTime") },
];

/// A draft model given by id becomes its full name, as a base model does.
async fn resolve_draft(ctx: &Ctx, body: &mut Map<String, Value>) -> anyhow::Result<()> {
    if let Some(draft) = body.get("draftModel").and_then(Value::as_str).filter(|d| !d.is_empty()) {
        let name = Ref::parse(draft, "models")?.name(&ctx.api, "models").await?;
        body.insert("draftModel".into(), json!(name));
    }
    Ok(())
}

fn count(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or(0)
}

pub async fn run(ctx: &Ctx, cmd: DeploymentCommand) -> anyhow::Result<()> {
    match cmd {
        DeploymentCommand::Create(args) => {
            let (body, _) = args.spec.to_json();
            let mut body = body;
            resolve_draft(ctx, &mut body).await?;
            let base = Ref::parse(&args.base_model, "models")?.name(&ctx.api, "models").await?;
            body.insert("baseModel".into(), json!(base));
            let mut query = Vec::new();
            if let Some(id) = &args.deployment_id {
                query.push(("deploymentId", id.clone()));
            }
            let path = ctx.api.path(COLLECTION).await?;
            let d = ctx.api.post(&path, &query, &Value::Object(body)).await?;
            let d = if args.wait.wait { wait_ready(ctx, &name_of(&d)?, &args.wait).await? } else { d };
            print_one(ctx.out, &d);
        }
        DeploymentCommand::Get { deployment } => {
            let path = Ref::parse(&deployment, COLLECTION)?.path(&ctx.api, COLLECTION, None).await?;
            print_one(ctx.out, &ctx.api.get(&path, &[]).await?);
        }
        DeploymentCommand::List { list, show_deleted } => {
            let mut query = list.query();
            if show_deleted {
                query.push(("showDeleted", "true".to_string()));
            }
            let path = ctx.api.path(COLLECTION).await?;
            let items = ctx.api.list_all(&path, "deployments", &query).await?;
            print_list(ctx.out, &items, COLUMNS);
        }
        DeploymentCommand::Update(args) => {
            let (mut body, mask) = args.spec.to_json();
            if mask.is_empty() {
                bail!("nothing to update: pass at least one field to change (see --help)");
            }
            resolve_draft(ctx, &mut body).await?;
            let r = Ref::parse(&args.deployment, COLLECTION)?;
            let path = r.path(&ctx.api, COLLECTION, None).await?;
            let d = ctx.api.patch(&path, &[("updateMask", mask.join(","))], &Value::Object(body)).await?;
            let d = if args.wait.wait { wait_ready(ctx, &name_of(&d)?, &args.wait).await? } else { d };
            print_one(ctx.out, &d);
        }
        DeploymentCommand::Delete { deployment, hard, ignore_checks, wait } => {
            let r = Ref::parse(&deployment, COLLECTION)?;
            let name = r.name(&ctx.api, COLLECTION).await?;
            let mut query = Vec::new();
            if hard {
                query.push(("hard", "true".to_string()));
            }
            if ignore_checks {
                query.push(("ignoreChecks", "true".to_string()));
            }
            ctx.api.delete(&format!("/v1/{name}"), &query).await?;
            if wait.wait {
                wait_deleted(ctx, &name, hard, &wait).await?;
            }
            println!("deleted deployment {name}");
        }
        DeploymentCommand::Undelete { deployment, wait } => {
            let path = Ref::parse(&deployment, COLLECTION)?.path(&ctx.api, COLLECTION, Some("undelete")).await?;
            let d = ctx.api.post(&path, &[], &json!({})).await?;
            let d = if wait.wait { wait_ready(ctx, &name_of(&d)?, &wait).await? } else { d };
            print_one(ctx.out, &d);
        }
        DeploymentCommand::Scale { deployment, replica_count, wait } => {
            let name = Ref::parse(&deployment, COLLECTION)?.name(&ctx.api, COLLECTION).await?;
            ctx.api.patch(&format!("/v1/{name}:scale"), &[], &json!({ "replicaCount": replica_count })).await?;
            let d = if wait.wait {
                wait_replicas(ctx, &name, replica_count, &wait).await?
            } else {
                ctx.api.get(&format!("/v1/{name}"), &[]).await?
            };
            print_one(ctx.out, &d);
        }
    }
    Ok(())
}

fn name_of(d: &Value) -> anyhow::Result<String> {
    match d["name"].as_str() {
        Some(n) => Ok(n.to_string()),
        None => bail!("the server's answer names no deployment"),
    }
}

/// "CREATING, 0 of 1 replicas ready".
fn progress(d: &Value) -> String {
    format!("{}, {} of {} replicas ready", field(d, "state"), count(d, "replicaCount"), count(d, "desiredReplicaCount"))
}

fn failed(name: &str, d: &Value) -> Option<String> {
    (field(d, "state") == "FAILED").then(|| {
        let why = field(d, "status.message");
        format!("deployment {name} FAILED: {}", if why.is_empty() { "no reason given" } else { &why })
    })
}

/// Waits for READY. A deployment that may sleep (no replica wanted until a request comes)
/// is done once the server has taken the change: it becomes READY on its first request.
async fn wait_ready(ctx: &Ctx, name: &str, w: &WaitArgs) -> anyhow::Result<Value> {
    let path = format!("/v1/{name}");
    let d = wait::until(&format!("deployment {name} to be READY"), w.timeout, || async {
        let d = ctx.api.get(&path, &[]).await?;
        if let Some(why) = failed(name, &d) {
            return Ok(Poll::Failed(why));
        }
        let state = field(&d, "state");
        if state == "DELETED" {
            return Ok(Poll::Failed(format!("deployment {name} was deleted")));
        }
        if state == "READY" || (state == "CREATING" && count(&d, "desiredReplicaCount") == 0) {
            return Ok(Poll::Done(d));
        }
        Ok(Poll::Pending(progress(&d)))
    })
    .await?;
    if field(&d, "state") != "READY" {
        eprintln!("note: deployment {name} wants no replica yet; it starts on its first request");
    }
    Ok(d)
}

/// Waits until `n` replicas are ready (and, for 0, none is left).
async fn wait_replicas(ctx: &Ctx, name: &str, n: i32, w: &WaitArgs) -> anyhow::Result<Value> {
    let path = format!("/v1/{name}");
    wait::until(&format!("deployment {name} to have {n} ready replicas"), w.timeout, || async {
        let d = ctx.api.get(&path, &[]).await?;
        if let Some(why) = failed(name, &d) {
            return Ok(Poll::Failed(why));
        }
        let ready = count(&d, "replicaCount");
        let starting = d["replicaStats"]["initializingReplicaCount"].as_i64().unwrap_or(0);
        if ready == i64::from(n) && (n > 0 || starting == 0) && field(&d, "state") != "UPDATING" {
            return Ok(Poll::Done(d));
        }
        let mut status = progress(&d);
        if n == 0 && ready > 0 {
            // The server keeps a replica up while the deployment has had requests within its
            // scale-to-zero window.
            status.push_str("; a deployment used within its scale-to-zero window keeps a replica until idle");
        }
        Ok(Poll::Pending(status))
    })
    .await
}

/// Waits until a soft-deleted deployment runs no replica, or a hard-deleted one is gone.
async fn wait_deleted(ctx: &Ctx, name: &str, hard: bool, w: &WaitArgs) -> anyhow::Result<()> {
    let path = format!("/v1/{name}");
    let what = if hard { format!("deployment {name} to be gone") } else { format!("deployment {name} to stop") };
    wait::until(&what, w.timeout, || async {
        let d = match ctx.api.get(&path, &[]).await {
            Ok(d) => d,
            Err(e) if is_code(&e, Code::NotFound) => return Ok(Poll::Done(())),
            Err(e) => return Err(e),
        };
        let starting = d["replicaStats"]["initializingReplicaCount"].as_i64().unwrap_or(0);
        if !hard && field(&d, "state") == "DELETED" && count(&d, "replicaCount") == 0 && starting == 0 {
            return Ok(Poll::Done(()));
        }
        Ok(Poll::Pending(progress(&d)))
    })
    .await
}
