"""The monitor's live network map: index.html, map.css and map.js, served by ``monitor`` at ``/``.
Plain files with no build step and nothing fetched from elsewhere, so the page works offline."""
