//! Every path the expansions emit: the macro's whole ABI with `cluster::__private`, in one place.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::Path;

/// The root the expansion names: `::cluster` or the user's `crate = "path"`.
#[derive(Clone)]
pub struct Krate(pub Option<Path>);

impl Krate {
    fn root(&self) -> TokenStream {
        match &self.0 {
            Some(p) => quote!(#p),
            None => quote!(::cluster),
        }
    }

    fn private(&self) -> TokenStream {
        let root = self.root();
        quote!(#root::__private)
    }

    pub fn run(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::run)
    }

    pub fn config(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::Config)
    }

    pub fn workers(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::Workers)
    }

    pub fn scheduling(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::SchedulingPolicy)
    }

    pub fn context(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::Context)
    }

    pub fn event(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::Event)
    }

    pub fn option(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::Option)
    }

    pub fn message_trait(&self, span: Span) -> TokenStream {
        let p = self.private();
        quote_spanned!(span=> #p::Message)
    }

    pub fn assert_message(&self, span: Span) -> TokenStream {
        let p = self.private();
        quote_spanned!(span=> #p::assert_message)
    }

    pub fn handler_output(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::HandlerOutput)
    }

    pub fn serde(&self) -> TokenStream {
        let p = self.private();
        quote!(#p::serde)
    }

    /// The serde path as the string `#[serde(crate = "..")]` wants.
    pub fn serde_string(&self) -> String {
        let root = match &self.0 {
            Some(p) => quote!(#p).to_string().replace(' ', ""),
            None => "::cluster".to_owned(),
        };
        format!("{root}::__private::serde")
    }
}
