//! `hearth model ...`: Models.

use anyhow::bail;
use clap::Subcommand;
use serde_json::{json, Map, Value};

use super::client::Ref;
use super::output::{field, print_list, print_one, short, Column};
use super::upload::{self, UploadArgs};
use super::wait::{self, Poll, WaitArgs};
use super::Ctx;

const COLLECTION: &str = "models";

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Create a model: with no files yet (`hearth model upload` creates one and uploads), or
    /// imported from a source (--from-hf, --from-url, --from-s3, --from-civitai); --wait
    /// waits for the import to end READY.
    Create {
        #[command(flatten)]
        args: CreateArgs,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Upload a model: a directory (Hugging Face layout or a PEFT adapter) or one GGUF file.
    ///
    /// Creates the model (or continues one still UPLOADING), uploads every file resumably and
    /// checked by SHA-256, and validates the upload; --wait waits for READY.
    Upload(UploadArgs),
    /// Show a model.
    Get {
        /// Model id or name (accounts/ACCOUNT/models/ID).
        model: String,
    },
    /// List models.
    List(ListArgs),
    /// Change a model's descriptive fields.
    Update(UpdateArgs),
    /// Delete a model and its files.
    Delete {
        /// Model id or name.
        model: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A base model (HF_BASE_MODEL).
    Base,
    /// A LoRA addon of a base model (HF_PEFT_ADDON).
    Addon,
}

impl Kind {
    pub fn wire(self) -> &'static str {
        match self {
            Kind::Base => "HF_BASE_MODEL",
            Kind::Addon => "HF_PEFT_ADDON",
        }
    }
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The new model's id.
    pub model_id: String,
    /// base or addon; an addon needs --base-model. Defaults to addon when --base-model is given.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// The base model of an addon (id or name).
    #[arg(long, value_name = "MODEL")]
    pub base_model: Option<String>,
    #[command(flatten)]
    pub fields: Fields,
}

/// Where an imported model's files come from: at most one of the --from flags.
#[derive(clap::Args, Default)]
pub struct SourceArgs {
    /// A Hugging Face Hub repository, REPO or REPO@REVISION (the Hub is HF_ENDPOINT on the server).
    #[arg(long, value_name = "REPO[@REVISION]", group = "source")]
    pub from_hf: Option<String>,
    /// An http(s) URL of a model file or of a .tar/.tar.gz of a model directory.
    #[arg(long, value_name = "URL", group = "source")]
    pub from_url: Option<String>,
    /// Every object directly under an S3 prefix, as s3://BUCKET/PREFIX.
    #[arg(long, value_name = "S3_URL", group = "source")]
    pub from_s3: Option<String>,
    /// A Civitai model page or download link.
    #[arg(long, value_name = "URL", group = "source")]
    pub from_civitai: Option<String>,
    /// A token for the Hub or Civitai (sent to the source by the server, never shown).
    #[arg(long, env = "HEARTH_SOURCE_TOKEN", hide_env_values = true)]
    pub source_token: Option<String>,
    /// A header for --from-url, as NAME:VALUE; repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE", requires = "from_url")]
    pub headers: Vec<String>,
}

impl SourceArgs {
    /// The `source` of the create request, if a --from flag was given.
    pub fn to_json(&self) -> anyhow::Result<Option<Value>> {
        if self.source_token.is_some() && self.from_hf.is_none() && self.from_civitai.is_none() {
            bail!("--source-token goes with --from-hf or --from-civitai");
        }
        let token = || self.source_token.clone().map(Value::String);
        let with_token = |mut v: Map<String, Value>| {
            if let Some(t) = token() {
                v.insert("token".into(), t);
            }
            Value::Object(v)
        };
        if let Some(hf) = &self.from_hf {
            let (repo, revision) = match hf.split_once('@') {
                Some((r, rev)) => (r, Some(rev)),
                None => (hf.as_str(), None),
            };
            let mut v = Map::new();
            v.insert("repo".into(), json!(repo));
            if let Some(rev) = revision {
                v.insert("revision".into(), json!(rev));
            }
            return Ok(Some(json!({ "huggingfaceSource": with_token(v) })));
        }
        if let Some(url) = &self.from_url {
            let mut headers = Map::new();
            for h in &self.headers {
                let Some((k, v)) = h.split_once(':') else { bail!("--header expects NAME:VALUE, got {h:?}") };
                headers.insert(k.trim().to_string(), json!(v.trim()));
            }
            return Ok(Some(json!({ "urlSource": { "url": url, "headers": headers } })));
        }
        if let Some(s3) = &self.from_s3 {
            let Some(rest) = s3.strip_prefix("s3://") else {
                bail!("--from-s3 expects s3://BUCKET/PREFIX, got {s3:?}")
            };
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            return Ok(Some(json!({ "awsS3Source": { "s3Bucket": bucket, "s3Path": prefix } })));
        }
        if let Some(url) = &self.from_civitai {
            let mut v = Map::new();
            v.insert("civitUrl".into(), json!(url));
            return Ok(Some(json!({ "civitaiSource": with_token(v) })));
        }
        Ok(None)
    }
}

/// The descriptive fields create and update set.
#[derive(clap::Args, Default)]
pub struct Fields {
    /// A human-readable name.
    #[arg(long)]
    pub display_name: Option<String>,
    /// A description.
    #[arg(long)]
    pub description: Option<String>,
    /// The context length to serve it with, in tokens.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub context_length: Option<i32>,
}

impl Fields {
    /// The fields set, as JSON, and their names for an update mask.
    fn to_json(&self) -> (Map<String, Value>, Vec<&'static str>) {
        let mut m = Map::new();
        let mut mask = Vec::new();
        if let Some(v) = &self.display_name {
            m.insert("displayName".into(), json!(v));
            mask.push("displayName");
        }
        if let Some(v) = &self.description {
            m.insert("description".into(), json!(v));
            mask.push("description");
        }
        if let Some(v) = self.context_length {
            m.insert("contextLength".into(), json!(v));
            mask.push("contextLength");
        }
        (m, mask)
    }
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// An AIP-160 filter, e.g. 'state="READY"'.
    #[arg(long)]
    pub filter: Option<String>,
    /// Sort order, e.g. "createTime desc".
    #[arg(long)]
    pub order_by: Option<String>,
}

impl ListArgs {
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(f) = &self.filter {
            q.push(("filter", f.clone()));
        }
        if let Some(o) = &self.order_by {
            q.push(("orderBy", o.clone()));
        }
        q
    }
}

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// Model id or name.
    pub model: String,
    #[command(flatten)]
    pub fields: Fields,
}

const COLUMNS: &[Column] = &[
    Column { heading: "ID", cell: |v| short(&field(v, "name")) },
    Column { heading: "KIND", cell: |v| field(v, "kind") },
    Column { heading: "STATE", cell: |v| field(v, "state") },
    Column { heading: "BASE MODEL", cell: |v| short(&field(v, "peftDetails.baseModel")) },
    Column { heading: "CREATED", cell: |v| field(v, "createTime") },
];

pub async fn run(ctx: &Ctx, cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Create { args, source, wait } => {
            let source = source.to_json()?;
            let imported = source.is_some();
            let mut model = create(ctx, &args, source).await?;
            if wait.wait && imported {
                let path = Ref::parse(&args.model_id, COLLECTION)?.path(&ctx.api, COLLECTION, None).await?;
                model = wait_ready(ctx, &path, &args.model_id, wait.timeout).await?;
            }
            print_one(ctx.out, &model);
        }
        ModelCommand::Upload(args) => upload::run(ctx, args).await?,
        ModelCommand::Get { model } => {
            let path = Ref::parse(&model, COLLECTION)?.path(&ctx.api, COLLECTION, None).await?;
            print_one(ctx.out, &ctx.api.get(&path, &[]).await?);
        }
        ModelCommand::List(args) => {
            let path = ctx.api.path(COLLECTION).await?;
            let items = ctx.api.list_all(&path, "models", &args.query()).await?;
            print_list(ctx.out, &items, COLUMNS);
        }
        ModelCommand::Update(args) => {
            let (body, mask) = args.fields.to_json();
            if mask.is_empty() {
                bail!("nothing to update: pass --display-name, --description or --context-length");
            }
            let path = Ref::parse(&args.model, COLLECTION)?.path(&ctx.api, COLLECTION, None).await?;
            let model = ctx.api.patch(&path, &[("updateMask", mask.join(","))], &Value::Object(body)).await?;
            print_one(ctx.out, &model);
        }
        ModelCommand::Delete { model } => {
            let r = Ref::parse(&model, COLLECTION)?;
            ctx.api.delete(&r.path(&ctx.api, COLLECTION, None).await?, &[]).await?;
            println!("deleted model {}", r.name(&ctx.api, COLLECTION).await?);
        }
    }
    Ok(())
}

/// Polls a model until it is READY; FAILED (an import that could not finish) or any status
/// with an error code ends the wait with the server's reason.
pub async fn wait_ready(ctx: &Ctx, path: &str, name: &str, timeout: std::time::Duration) -> anyhow::Result<Value> {
    wait::until(&format!("model {name} to be READY"), timeout, || async {
        let m = ctx.api.get(path, &[]).await?;
        let code = field(&m, "status.code");
        if field(&m, "state") == "READY" {
            Ok(Poll::Done(m))
        } else if field(&m, "state") == "FAILED" || (!code.is_empty() && code != "OK") {
            Ok(Poll::Failed(format!("model {name}: {code}: {}", field(&m, "status.message"))))
        } else {
            Ok(Poll::Pending(field(&m, "state")))
        }
    })
    .await
}

/// Creates a model, with no files or imported from `source`; the kind defaults to addon
/// when a base model is named.
pub async fn create(ctx: &Ctx, args: &CreateArgs, source: Option<Value>) -> anyhow::Result<Value> {
    let kind = args.kind.unwrap_or(if args.base_model.is_some() { Kind::Addon } else { Kind::Base });
    let (mut model, _) = args.fields.to_json();
    model.insert("kind".into(), json!(kind.wire()));
    match (kind, &args.base_model) {
        (Kind::Base, None) => {
            model.insert("baseModelDetails".into(), json!({}));
        }
        (Kind::Base, Some(_)) => bail!("--base-model is for addons; a base model has none"),
        (Kind::Addon, Some(base)) => {
            let base = Ref::parse(base, COLLECTION)?.name(&ctx.api, COLLECTION).await?;
            model.insert("peftDetails".into(), json!({ "baseModel": base }));
        }
        (Kind::Addon, None) => bail!("an addon needs --base-model: the base model it adapts"),
    }
    let path = ctx.api.path(COLLECTION).await?;
    let mut body = json!({"modelId": args.model_id, "model": model});
    if let Some(source) = source {
        body["source"] = source;
    }
    ctx.api.post(&path, &[], &body).await
}
