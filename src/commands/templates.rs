//! `templates`: every template with its nodes and current input values, and the files that could not be used.

use super::fields::Body;
use super::response::Failure;
use super::{Applied, Context, Spec};

/// `templates` takes no fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ListTemplates;

impl Spec for ListTemplates {
    const NAME: &'static str = "templates";
    const FIELDS: &'static [&'static str] = &[];

    fn parse(_: &mut Body, _: usize) -> Result<Self, Failure> {
        Ok(ListTemplates)
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        Applied::Done(Ok(cx.templates.describe()))
    }
}
