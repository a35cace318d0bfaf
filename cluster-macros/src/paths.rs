//! Every path the expansions emit: the macro's whole ABI with `cluster::__private`, in one place.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, Path};

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

    /// `use <root> as __cluster;`, and the `Krate` that names paths through that alias. Inside
    /// a function body, paths through the alias make a wrong `crate = ".."` one error on the
    /// import, not one per emitted path.
    pub fn import(&self) -> (TokenStream, Krate) {
        let root = self.root();
        // On the user's `crate = ".."` string, where an unresolved path is reported.
        let span = self.0.as_ref().map_or_else(Span::call_site, Spanned::span);
        let alias = Ident::new("__cluster", Span::mixed_site().located_at(span));
        let import = quote_spanned!(span=> use #root as #alias;);
        (import, Krate(Some(Path::from(alias))))
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
