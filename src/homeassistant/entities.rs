//! The template select and the prompt text: Home Assistant's way to queue a prompt. Pure: the command task
//! holds [`Entities`], publishes what they say and queues what a [`Set`] asks for.

use bytes::Bytes;

use super::{discovery, route, state_text, Config};

/// The select's and the text's states.
#[derive(Debug)]
pub struct Entities {
    config: Config,
    selected: Option<String>,
    prompt: String,
}

/// What a set of an entity asks for.
#[derive(Debug, PartialEq)]
pub enum Set {
    /// Publish the entity's new state (retained).
    State(String, Bytes),
    /// Publish the prompt's new state (retained), then queue `template` with `input` set to `text`.
    Queue {
        /// The prompt entity's state topic and payload.
        state: (String, Bytes),
        /// The selected template.
        template: String,
        /// The template input the prompt goes to (`homeassistant.prompt_input`).
        input: String,
        /// The prompt, as set.
        text: String,
    },
    /// Nothing to do; why, for the log.
    Ignored(&'static str),
}

impl Entities {
    /// The entities of `config`'s instance, the select on `first_template` when there is one.
    pub fn new(config: Config, first_template: Option<String>) -> Self {
        Self { config, selected: first_template, prompt: String::new() }
    }

    fn topic(&self, entity: &str) -> String {
        route(&self.config.instance, &[entity]).mqtt_topic(&self.config.base_topic)
    }

    /// Every discovery config and the select's and text's states: `(topic, retained payload)`.
    pub fn announce(&self, templates: &[String], commands: bool) -> Vec<(String, Bytes)> {
        let mut messages = discovery(&self.config, templates, commands);
        if let Some(selected) = &self.selected {
            messages.push((self.topic("template"), Bytes::from(selected.clone())));
        }
        messages.push((self.topic("prompt"), Bytes::from(self.prompt.clone())));
        messages
    }

    /// Home Assistant set `entity` to `value`; `is_template` says which names are templates.
    pub fn set(&mut self, entity: &str, value: &str, is_template: impl Fn(&str) -> bool) -> Set {
        match entity {
            "template" if is_template(value) => {
                self.selected = Some(value.to_string());
                Set::State(self.topic("template"), Bytes::from(value.to_string()))
            }
            "template" => Set::Ignored("no such template"),
            "prompt" => {
                self.prompt = state_text(value);
                let state = (self.topic("prompt"), Bytes::from(self.prompt.clone()));
                match self.selected.clone() {
                    Some(template) => {
                        Set::Queue { state, template, input: self.config.prompt_input.clone(), text: value.to_string() }
                    }
                    None => Set::Ignored("no template to queue"),
                }
            }
            _ => Set::Ignored("no such entity"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn the_prompt_queues_the_selected_template_and_a_template_must_exist() {
        let mut settings = Settings::default();
        settings.homeassistant.enabled = true;
        let mut entities = Entities::new(Config::from(&settings), Some("probe".into()));
        let templates = |name: &str| ["probe", "txt2img"].contains(&name);
        assert_eq!(entities.set("template", "nope", templates), Set::Ignored("no such template"));
        assert_eq!(
            entities.set("template", "txt2img", templates),
            Set::State("comfyui/local/ha/template".into(), Bytes::from("txt2img"))
        );
        let Set::Queue { state, template, input, text } = entities.set("prompt", "a red fox", templates) else {
            panic!("a prompt set queues");
        };
        assert_eq!(
            (state.0.as_str(), template.as_str(), text.as_str()),
            ("comfyui/local/ha/prompt", "txt2img", "a red fox")
        );
        assert_eq!(input, settings.homeassistant.prompt_input);
        let announced = entities.announce(&["probe".into(), "txt2img".into()], true);
        assert!(announced.contains(&("comfyui/local/ha/prompt".into(), Bytes::from("a red fox"))));
        assert!(announced.contains(&("comfyui/local/ha/template".into(), Bytes::from("txt2img"))));
        let mut none = Entities::new(Config::from(&settings), None);
        assert_eq!(none.set("prompt", "x", templates), Set::Ignored("no template to queue"));
    }
}
