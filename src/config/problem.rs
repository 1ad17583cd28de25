//! What loading the configuration reports: each [`Problem`] worded for the operator who must
//! fix it and naming where to look, and [`ConfigErrors`], all of them at once.

use std::fmt;

/// One thing wrong with the configuration, worded for the operator who must fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where to look: the environment variable, or `file:line`; `None` for a rule between
    /// settings, whose message names them all.
    pub at: Option<String>,
    /// What is wrong; never a secret's value.
    pub message: String,
}

impl Problem {
    pub(super) fn at(at: impl fmt::Display, message: impl Into<String>) -> Problem {
        Problem {
            at: Some(at.to_string()),
            message: message.into(),
        }
    }

    pub(super) fn between(message: impl Into<String>) -> Problem {
        Problem {
            at: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Every problem found while loading: one line each, so one run shows them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} configuration problems:", all.len())?;
                all.iter().try_for_each(|p| write!(f, "\n  {p}"))
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}
