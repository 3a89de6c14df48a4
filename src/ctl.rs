//! The `fifobind` command: what lives in the runtime directory, by name.
//!
//! Scripts should not redo the three-step lookup of the runtime directory
//! (the docs' own one-liner for it was wrong when neither variable is set):
//! `fifo=$(fifobind path in1)` asks the code the bindings themselves use.
//! Each subcommand is a variant of [`Command`] and a function here.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use crate::args::Id;
use crate::error::{Error, ExitStatus, Result};
use crate::runtime_dir;

/// See and handle what lives in the runtime directory of the fifobind
/// commands.
#[derive(clap::Parser, Debug)]
#[command(
    name = "fifobind",
    version,
    arg_required_else_help = false,
    disable_help_subcommand = true
)]
pub struct Fifobind {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// Print the path of the FIFO of ID, whether or not it exists; exit 0
    /// if a FIFO is there, 1 if not
    Path {
        /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
        #[arg(value_name = "ID")]
        id: Id,
    },
    /// List every live binding, pool and master, with its figures
    #[command(visible_alias = "ls")]
    List(crate::ctl_list::ListArgs),
    /// Stop bindings, pools and masters by name, and wait until they are gone
    Stop(crate::ctl_stop::StopArgs),
    /// Print the completion script of every command for a shell
    Completions(crate::completions::CompletionsArgs),
}

pub fn run(cli: Fifobind) -> Result<()> {
    match cli.command {
        Command::Path { id } => path(&id),
        Command::List(a) => crate::ctl_list::run(a),
        Command::Stop(a) => crate::ctl_stop::run(a),
        Command::Completions(a) => {
            crate::completions::run(a, <Fifobind as clap::CommandFactory>::command())
        }
    }
}

/// The FIFO of `id` as the bindings resolve it: absolute, never created
/// (asking for a path must not make the directory appear).
pub(crate) fn fifo_path(id: &Id) -> Result<PathBuf> {
    let dir = runtime_dir::locate();
    // Only a relative FIFOBIND_DIR can fail here: the current directory
    // is gone. That is reading the file system failing (74), whatever
    // errno says.
    let dir = std::path::absolute(&dir).map_err(|e| {
        let what = format!(
            "cannot make the runtime directory {} absolute",
            dir.display()
        );
        let mut err = Error::io(what, &e);
        err.status = ExitStatus::IoErr;
        err
    })?;
    Ok(dir.join(id.as_str()))
}

fn path(id: &Id) -> Result<()> {
    let fifo = fifo_path(id)?;
    println!("{}", fifo.display());
    let is_fifo = std::fs::symlink_metadata(&fifo).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        Ok(())
    } else {
        // Not an error to report: the path is the answer, the status says
        // whether a binding's FIFO is there now.
        Err(Error::new(ExitStatus::Failure, String::new()))
    }
}
