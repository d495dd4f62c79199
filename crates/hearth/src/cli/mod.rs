//! The client commands of the `hearth` binary: `model`, `deployment`, `lora` and `chat`
//! speak HTTP to a hearth server (the Gateway REST API and the OpenAI-style inference
//! route), as `firectl` does to Fireworks. Nothing here touches a store directly.

mod chat;
mod client;
mod config;
mod deployments;
mod lora;
mod models;
mod output;
mod upload;
mod wait;

use std::io::Write;

use clap::Subcommand;

use client::Api;
use config::Settings;
use output::Format;

/// Where the server is and how to print: accepted by every client command, before or after
/// its verb.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// The hearth server's URL [env: HEARTH_BASE_URL; default http://127.0.0.1:8080].
    #[arg(long, global = true, value_name = "URL", help_heading = "Connection")]
    base_url: Option<String>,
    /// The API key [env: HEARTH_API_KEY].
    #[arg(long, global = true, value_name = "KEY", help_heading = "Connection")]
    api_key: Option<String>,
    /// The account [env: HEARTH_ACCOUNT; default: the API key's account].
    #[arg(long, global = true, value_name = "ACCOUNT", help_heading = "Connection")]
    account: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table, help_heading = "Output")]
    output: Format,
}

/// The client commands, flattened into the binary's top-level commands.
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Models: create, upload files, get, list, update, delete.
    Model {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: models::ModelCommand,
    },
    /// Deployments of base models: create, get, list, update, scale, delete, undelete.
    Deployment {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: deployments::DeploymentCommand,
    },
    /// LoRA addons on deployments (DeployedModels): load, unload, get, list.
    Lora {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        cmd: lora::LoraCommand,
    },
    /// Chat with a model: one message, or an interactive session with streamed answers.
    Chat {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        args: chat::ChatArgs,
    },
}

/// What every client command works with.
pub struct Ctx {
    pub api: Api,
    pub out: Format,
}

impl Ctx {
    fn new(conn: Connection) -> anyhow::Result<Ctx> {
        let flags = Settings { base_url: conn.base_url, api_key: conn.api_key, account: conn.account };
        let env = |k: &str| std::env::var(k).ok();
        let mut settings = flags.or(Settings::from_env(env));
        // The file is read only when something is still missing, so a broken file does not
        // stand in the way of a fully specified command.
        if settings.base_url.is_none() || settings.api_key.is_none() || settings.account.is_none() {
            settings = settings.or(config::load_file(env)?);
        }
        Ok(Ctx { api: Api::new(settings)?, out: conn.output })
    }
}

/// Runs a client command; returns the process exit status (errors are printed here).
pub async fn run(cmd: ClientCommand) -> i32 {
    let result = async {
        match cmd {
            ClientCommand::Model { conn, cmd } => models::run(&Ctx::new(conn)?, cmd).await,
            ClientCommand::Deployment { conn, cmd } => deployments::run(&Ctx::new(conn)?, cmd).await,
            ClientCommand::Lora { conn, cmd } => lora::run(&Ctx::new(conn)?, cmd).await,
            ClientCommand::Chat { conn, args } => chat::run(&Ctx::new(conn)?, args).await,
        }
    }
    .await;
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => 0,
        Err(e) => {
            // With its context: "uploading x: NOT_FOUND: ..."; a server error alone prints as
            // `CODE_NAME: message` (ApiError's Display).
            eprintln!("error: {e:#}");
            1
        }
    }
}
