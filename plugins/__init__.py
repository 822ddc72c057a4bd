"""Built-in pipeline plugins, one module per config name.

Each module holds one module-level object providing
L{gateway.interfaces.IPluginFactory}; C{getPlugins(IPluginFactory, plugins)}
finds them.  Folders from C{[server] plugin_dirs} are appended to this
package's C{__path__} at start-up by L{gateway.registry}; nothing else is.
Modules here must be cheap to import (heavy imports go inside C{build()}),
because discovery imports every module.
"""
