//! docs/cli.md, written from the argument parser itself: every command, flag, default and
//! environment variable as `runner` accepts them. A test fails when the file drifts from
//! the parser; `RUNNER_BLESS=1 cargo test -p runner-cli cli_reference` rewrites it.

use clap::{ArgAction, Command};

/// The whole reference, as Markdown.
pub fn markdown(cli: &Command) -> String {
    let mut out = String::from(
        "# runner command-line reference\n\n\
         Generated from runner's own argument parser (`crates/runner-cli/src/reference.rs`);\n\
         a test fails when it drifts. Rewrite it with\n\
         `RUNNER_BLESS=1 cargo test -p runner-cli cli_reference`.\n\n\
         Every flag can also be set through the environment variable beside it; a flag on\n\
         the command line wins.\n\n",
    );
    let globals: Vec<&clap::Arg> = cli
        .get_arguments()
        .filter(|a| a.is_global_set() && !a.is_hide_set())
        .collect();
    out.push_str("## Global options\n\nThey go before or after the command.\n\n");
    table(&mut out, globals.iter().copied());
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        out.push_str(&format!("\n## runner {}\n\n", sub.get_name()));
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        out.push_str(&about);
        out.push_str(if about.ends_with('.') {
            "\n\n"
        } else {
            ".\n\n"
        });
        let aliases: Vec<&str> = sub.get_visible_aliases().collect();
        if !aliases.is_empty() {
            out.push_str(&format!(
                "Also called: {}.\n\n",
                aliases
                    .iter()
                    .map(|a| format!("`runner {a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut usage = sub.clone().bin_name(format!("runner {}", sub.get_name()));
        out.push_str(&format!(
            "```\n{}\n```\n\n",
            usage
                .render_usage()
                .to_string()
                .trim_start_matches("Usage: ")
        ));
        table(
            &mut out,
            sub.get_arguments()
                .filter(|a| !a.is_hide_set() && !a.is_global_set() && !is_builtin(a)),
        );
    }
    out
}

fn is_builtin(arg: &clap::Arg) -> bool {
    matches!(
        arg.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

fn table<'a>(out: &mut String, args: impl Iterator<Item = &'a clap::Arg>) {
    out.push_str("| argument | environment | default | what it does |\n|---|---|---|---|\n");
    for arg in args {
        let takes_value = matches!(arg.get_action(), ArgAction::Set | ArgAction::Append);
        let value = arg
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| v.to_string())
            .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
        let name = if arg.is_positional() {
            format!("`{value}`")
        } else {
            let mut forms = Vec::new();
            if let Some(short) = arg.get_short() {
                forms.push(format!("-{short}"));
            }
            if let Some(long) = arg.get_long() {
                forms.push(format!("--{long}"));
            }
            let repeat = if matches!(arg.get_action(), ArgAction::Append | ArgAction::Count) {
                " …"
            } else {
                ""
            };
            if takes_value {
                format!("`{} <{value}>`{repeat}", forms.join(", "))
            } else {
                format!("`{}`{repeat}", forms.join(", "))
            }
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let default = arg
            .get_default_values()
            .iter()
            .map(|d| format!("`{}`", d.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ");
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|p| !p.is_hide_set())
            .map(|p| format!("`{}`", p.get_name()))
            .collect();
        // clap drops a lone sentence's full stop; the table's cells end with one.
        if !help.is_empty() && !help.ends_with('.') {
            help.push('.');
        }
        // A flag without a value accepts true/false from its variable; that is not a choice.
        if takes_value && !choices.is_empty() {
            help.push_str(&format!(" One of {}.", choices.join(", ")));
        }
        if arg.is_required_set() {
            help.push_str(" Required.");
        }
        out.push_str(&format!(
            "| {name} | {env} | {default} | {} |\n",
            help.replace('|', "\\|")
        ));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::Cli;

    #[test]
    fn cli_reference_matches_the_parser() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/cli.md");
        let ours = super::markdown(&Cli::command());
        if std::env::var_os("RUNNER_BLESS").is_some() {
            std::fs::write(path, &ours).unwrap();
            return;
        }
        let theirs = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            ours == theirs,
            "docs/cli.md is out of date with runner's flags: rewrite it with \
             `RUNNER_BLESS=1 cargo test -p runner-cli cli_reference` and commit it"
        );
    }

    /// Every option can come from the environment (containers and Modal/Replicate set
    /// flags that way), except the few that make no sense there.
    #[test]
    fn every_option_has_an_environment_variable() {
        // -i repeats per input; --cold-start names the only benchmark; `generate`'s
        // architecture and folder are what the command is about.
        let exempt = [
            ("run", "inputs"),
            ("bench", "cold_start"),
            ("generate", "architecture"),
            ("generate", "dir"),
        ];
        let cli = Cli::command();
        let mut missing = Vec::new();
        let commands = std::iter::once(&cli).chain(cli.get_subcommands());
        for command in commands {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                let builtin = matches!(id, "help" | "version");
                if arg.get_env().is_none()
                    && !builtin
                    && !exempt.contains(&(command.get_name(), id))
                {
                    missing.push(format!("{} {id}", command.get_name()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "without an environment variable: {missing:?}"
        );
    }
}
